"""HL7 v2 helpers shared by the sending side of refloop: MLLP framing and a small blocking client."""
