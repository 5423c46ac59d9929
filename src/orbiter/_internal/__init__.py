"""Internal modules of orbiter; the names the reference API documents live here."""
