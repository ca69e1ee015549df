"""DVC stage scripts, one per stage kind (`python -m stages.<name>`), and their shared wiring."""
