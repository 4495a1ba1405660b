"""TFF and Keras objects -> an Overnight task, exactly or not at all.

Each module translates one kind of object a TFF user already writes: the model and its loss
(`models`), client and server optimizers (`optimizers`) and aggregation factories
(`aggregators`). What cannot be translated exactly raises `NotTranslatable`, naming the object
and what is supported; nothing is approximated. These modules import TensorFlow and TFF, so
they are imported only when a task is created, never by `import overnight`.
"""

from overnight.tff_translation.errors import NotTranslatable

__all__ = ["NotTranslatable"]
