"""Pneumonia chest X-ray training system."""
