"""SMTP AUTH users: argon2 hashes only, checked without blocking the event loop.

A verified (user, password) pair is remembered by its keyed digest, so an
old scanner that logs in for every page does not pay argon2's cost each time.
`check()` runs argon2 in a worker thread, at most VERIFY_CONCURRENCY at once:
each verification takes tens of milliseconds and 64 MiB, so a flood of
wrong passwords neither stalls the other sessions nor exhausts memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()
VERIFY_CONCURRENCY = 2


def hash_password(password: str) -> str:
    """The hash `faxgw passwd` prints for the config's [smtp.users] table."""
    return _HASHER.hash(password)


def verify_hash(stored: str, password: str) -> bool:
    """Whether `password` matches an argon2 hash (the web console's users); slow on purpose: run it in a thread."""
    try:
        return _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


class PasswordChecker:
    def __init__(self, users: dict[str, str]) -> None:
        self._users = dict(users)
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._dummy: str | None = None
        self._slots: asyncio.Semaphore | None = None

    async def check(self, user: str, password: bytes) -> bool:
        """`verify()` in a worker thread, so the event loop keeps serving the other sessions."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(VERIFY_CONCURRENCY)
        async with self._slots:
            return await asyncio.to_thread(self.verify, user, password)

    def verify(self, user: str, password: bytes) -> bool:
        stored = self._users.get(user)
        if stored is None:
            self._spend_time(password)
            return False
        digest = hmac.new(self._key, user.encode() + b"\0" + password, hashlib.sha256).digest()
        if digest in self._verified:
            return True
        try:
            _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False
        if len(self._verified) > 1024:
            self._verified.clear()
        self._verified.add(digest)
        return True

    def _spend_time(self, password: bytes) -> None:
        """Cost an unknown user as much as a known one, so user names cannot be probed."""
        if self._dummy is None:
            self._dummy = _HASHER.hash(secrets.token_hex(16))
        try:
            _HASHER.verify(self._dummy, password)
        except VerificationError:
            pass
