"""Load modules of fairseq's old ``examples/speech_recognition`` package privately (fairseq glue).

fairseq ships its VGG-Transformer in ``fairseq/examples/speech_recognition/models/vggtransformer.py``,
but that package cannot be imported from the installed wheel: its modules import ``examples.*`` as a
top-level package, and its ``__init__`` pulls in a data loader that calls the removed
``torchaudio.load_wav``. Its modules also register the model names ``asr_vggtransformer`` and
``vggtransformer_*`` on import, which would clash with a user who loads fairseq's examples as well.

:func:`load_example_module` executes one such file under a private module name with

* the one ``examples.*`` module it imports (``examples.speech_recognition.data.data_utils``, which
  only needs torch) provided from the same fairseq installation for the duration of the load, and
* fairseq's ``register_model`` / ``register_model_architecture`` replaced by no-ops, so nothing of
  it enters fairseq's registries (the plugin registers its own, clash-free names).

The fairseq source file itself is used unchanged.
"""
import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from unittest import mock

import fairseq
import fairseq.models

EXAMPLES_DIR = os.path.join(os.path.dirname(fairseq.__file__), "examples")
#: ``examples.*`` modules the loaded files import, by the file that provides each
SHIMMED = {"examples.speech_recognition.data.data_utils": "speech_recognition/data/data_utils.py"}


def _exec_file(name: str, path: str) -> types.ModuleType:
    if not os.path.isfile(path):
        raise ImportError(f"fairseq's example file {path} is missing (a fairseq build without examples?)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _examples_shim():
    """``examples.<...>`` importable from this fairseq's files while the context lasts (existing entries kept)."""
    added = []
    for dotted, rel in SHIMMED.items():
        parts = dotted.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in sys.modules:
                package = types.ModuleType(parent)
                package.__path__ = []
                sys.modules[parent] = package
                added.append(parent)
        if dotted not in sys.modules:
            sys.modules[dotted] = _exec_file(f"fairseq_pdd.models._examples.{parts[-1]}", os.path.join(EXAMPLES_DIR, rel))
            added.append(dotted)
    try:
        yield
    finally:
        for name in reversed(added):
            del sys.modules[name]


def _no_registration(*args, **kwargs):
    return lambda cls: cls


def load_example_module(relative_path: str) -> types.ModuleType:
    """Execute ``fairseq/examples/<relative_path>`` as a private module, registering nothing with fairseq."""
    name = "fairseq_pdd.models._examples." + relative_path[:-3].replace("/", ".")
    if name in sys.modules:
        return sys.modules[name]
    with _examples_shim(), mock.patch.object(fairseq.models, "register_model", _no_registration), \
            mock.patch.object(fairseq.models, "register_model_architecture", _no_registration):
        module = _exec_file(name, os.path.join(EXAMPLES_DIR, relative_path))
    sys.modules[name] = module
    return module
