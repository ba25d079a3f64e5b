"""Notifications: built on realtime's public API (see its issue)."""
