"""training: regenerate registry entries from their recipes (imports dictionaries/, never the reverse)."""
