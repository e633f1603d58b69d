"""refloop: an HL7 v2 MLLP listener that closes the specialist-referral loop."""

__version__ = "0.1.0"
