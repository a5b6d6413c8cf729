"""Torch-free detection logic shared by the trainer's evaluation, the live server and batch jobs."""
