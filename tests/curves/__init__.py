"""Tests for learning-curve fitting, prediction and plotting (`shoal.curves`)."""
