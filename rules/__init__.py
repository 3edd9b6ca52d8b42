"""Shipped rule files (TOML). Loaded by gateway.rules; this file only makes them package data."""
