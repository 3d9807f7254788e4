"""Unit test for fedlm/data/__init__.py: the package's public names, each from the one module that holds it."""

import importlib

import pytest

import fedlm.data


def test_each_public_name_comes_from_the_module_that_defines_it() -> None:
    assert fedlm.data.__all__ == ["ClientData", "READERS", "build_client_data", "check_local_text",
                                  "client_data_path", "load_corpus", "load_texts", "pack_texts", "partition_corpus",
                                  "prepare_device_data", "prepare_federation"]
    for name in fedlm.data.__all__:
        home = importlib.import_module(f"fedlm.data.{fedlm.data._HOMES[name]}")
        value = getattr(fedlm.data, name)
        assert value is vars(home)[name]
        assert getattr(value, "__module__", home.__name__) == home.__name__  # defined there, not imported into it
    from fedlm.data import ClientData, prepare_federation  # the imports callers wrote before the split

    assert ClientData.__module__ == prepare_federation.__module__ == "fedlm.data.preparation"
    with pytest.raises(AttributeError, match="module 'fedlm.data' has no attribute 'write_json_atomic'"):
        fedlm.data.write_json_atomic  # noqa: B018 -- moved to fedlm/files.py, its one home
