"""Generation backends: detection, segmentation and customization for the real path."""
