"""Aggregation code shared by devices and the coordinator: codecs, rotation, clipping math.

numpy only: no TensorFlow and no server code. The coordinator imports it, so every codec has
exactly one implementation.
"""
