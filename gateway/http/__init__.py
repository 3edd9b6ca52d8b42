"""The HTTP face: Notify, the JSON API, health and metrics, and its connection guard."""
