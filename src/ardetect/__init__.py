"""ardetect."""
