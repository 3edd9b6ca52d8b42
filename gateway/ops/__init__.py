"""Operations: upgrades, backups, retention, reload."""
