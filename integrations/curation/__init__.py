"""Curation: review batch outputs in Label Studio and turn the reviews into training data (issue 10)."""
