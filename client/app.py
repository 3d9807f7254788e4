"""The Flower ClientApp: SecAgg+'s protocol stages, and local training and evaluation (client/lora_client.py).

In deployment the SuperNode starts a fresh process for every message and imports this module each time: it
stays light (Flower and settings only). torch, PEFT and the model load only for the messages that train or
evaluate, so SecAgg+'s setup, share-keys and unmask stages cost a Flower import, not a model load.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, MessageType
from flwr.client import Client, ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, GetPropertiesRes, MessageTypeLegacy, Status
from flwr.compat.common import recorddict_compat as compat
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlm.protocol import DECLINED, BudgetExceeded
from fedlm.settings import RunSettings, settings_from_run_config

def client_identity(context: Context) -> str:
    """Who this client is across runs and restarts: its partition in simulation, else its node."""
    return str(context.node_config.get("partition-id", context.node_id))


def identify(msg: Message, context: Context, call_next) -> Message:
    """Answer the server's identity query (server/sampling.py) without building the client: no model load."""
    if msg.metadata.message_type != MessageTypeLegacy.GET_PROPERTIES:
        return call_next(msg, context)
    res = GetPropertiesRes(status=Status(Code.OK, ""), properties={"client-id": client_identity(context)})
    return Message(compat.getpropertiesres_to_recorddict(res), reply_to=msg)


def declines_as_refusals(msg: Message, context: Context, call_next) -> Message:
    """A client that will not train answers with the DECLINED error code, which the server counts as a
    non-participant (not a failure) without reading the message text."""
    try:
        return call_next(msg, context)
    except BudgetExceeded as refusal:
        return Message(error=Error(code=DECLINED, reason=str(refusal)), reply_to=msg)


def secagg_when_requested(msg: Message, context: Context, call_next) -> Message:
    """Run SecAgg+'s client side for training messages that carry its protocol stage; pass the rest through.

    The server's settings decide whether a round is secure; the client follows the protocol it is sent.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(settings: RunSettings | None = None, extra_mods: tuple = ()) -> ClientApp:
    """A ClientApp for `settings`, or (for `flwr run` and devices) for the settings in the run config.

    `extra_mods` run before SecAgg+ (tests use them to inject faults at a given protocol stage).
    """

    def client_fn(context: Context) -> Client:
        from client.lora_client import LoraClient  # here, not above: see the module docstring

        run_settings = settings or settings_from_run_config(context.run_config)
        # A device has no partition: its node id names it in metrics and seeds (simulation sets partition-id),
        # folded to 31 bits so seeds derived from it stay within torch's 64-bit range.
        partition_id = int(context.node_config.get("partition-id", context.node_id % 2**31))
        return LoraClient(run_settings, partition_id, dict(context.node_config), context.run_id).to_client()

    return ClientApp(client_fn=client_fn, mods=[identify, declines_as_refusals, *extra_mods, secagg_when_requested])


app = build_client_app()
