"""Under SecAgg+ a client refuses to send values the protocol would clip silently."""

import numpy as np
import pytest

from client.lora_client import LoraClient
from fedlm.settings import RunSettings, settings_from_dict


def _client(clipping_range: float) -> LoraClient:
    client = object.__new__(LoraClient)  # only what the check reads: no model, no data
    client.settings = settings_from_dict(RunSettings, {"secagg": {"clipping_range": clipping_range}})
    client.partition_id = 5
    return client


def test_a_value_outside_the_clipping_range_is_refused_with_the_fix():
    arrays = [np.zeros((2, 2), np.float32), np.array([0.5, -3.25], np.float32)]
    with pytest.raises(ValueError, match=r"client 5: an adapter value of 3.25 lies outside secagg.clipping_range=2.0, "
                                         r"which SecAgg\+ would clip silently; raise secagg.clipping_range to at "
                                         r"least 6.5"):
        _client(2.0).check_clipping_range(arrays)


def test_values_inside_the_range_pass():
    _client(4.0).check_clipping_range([np.array([3.99, -4.0], np.float32)])  # the bound itself is inside
