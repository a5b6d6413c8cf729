"""Detector network parts: layers, DFA conv, DynE encoder, STA, multi-scale dynamic heads."""
