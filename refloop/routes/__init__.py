"""Message type -> handler registry, and the handlers that turn HL7 into referral events."""
