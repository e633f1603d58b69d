"""Notifications: stall scan, outbox dispatch and the delivery channels (webhook, e-mail, MLLP)."""
