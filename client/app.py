"""The ClientApp: Flower's adapter for a site. It reads the site's policy, admits the round's
request (client/admission.py), plays the round (client/round.py), logs the outcome, and holds
the reply until the policy's bound.

The site reads nothing from Flower's run config: what the coordinator asks arrives in the
message as a typed request (common/request.py), and everything else is the site's own.
"""

from __future__ import annotations

# Before anything else: see common/preload.py for the two-thread import race this prevents.
import common.preload  # noqa: F401, I001

import logging
import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.admission import Refusal, admit, read_request, server_round_of, site_settings_error
from client.round import refusal, train_round
from client.site import load_site, site_name
from common import payload as P
from common.config import ConfigError
from common.monitoring import record_activity
from common.policy import SitePolicy, site_policy

log = logging.getLogger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=answer(msg.content, context), reply_to=msg)


def answer(content: RecordDict, context: Context) -> RecordDict:
    """This site's reply to a training request: a trained reply or a refusal, never an exception.

    An exception's text would reach the server in Flower's error reply, so errors are
    logged here and the server gets a code. Every outcome is added to the site's activity
    log (common.monitoring), which its metrics endpoint serves.
    """
    started = time.monotonic()
    node = context.node_config
    partition_id = int(node.get("partition-id", 0))
    name = site_name(partition_id)
    policy = None
    try:
        policy = site_policy(node)
        name = policy.name or name
        request = content.config_records.get(P.CONFIG, ConfigRecord())
        server_round = server_round_of(request)
        config = admit(read_request(request), policy)
        try:
            site = load_site(config, policy, partition_id, int(node.get("num-partitions", 1)))
        except ConfigError as err:
            raise site_settings_error(err) from None
        reply = train_round(site, content, context.state, server_round=server_round, run=str(context.run_id))
    except Refusal as refused:
        reply = refusal(name, refused)
    except Exception:
        log.exception("%s: the round failed", name)
        reply = refusal(name, Refusal(P.REFUSAL_SITE_ERROR,
                                      "the site could not take part in this round (details in the site's log)"))
    if policy is not None:
        status = reply[P.CONFIG]
        record_activity(policy.ledger_root / name, run=str(context.run_id), server_round=round_number(content),
                        status=str(status[P.STATUS]), code=status.get(P.CODE),
                        steps=int(reply.metric_records.get(P.METRICS, MetricRecord()).get(P.DP_STEPS, 0)))
        hold_reply(policy, started, name)
    return reply


def hold_reply(policy: SitePolicy, started: float, name: str, *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Keep the reply until `policy.reply_after_s` after the request came (sites with records of
    their own), so that how long the site worked does not tell the coordinator how many records
    it holds. A round that overran the bound is logged: its reply's time then says so."""
    if not policy.pads_replies:
        return
    left = started + policy.reply_after_s - clock()
    if left > 0:
        sleep(left)
    else:
        log.warning("%s: the round took %.1f s, more than reply_after_s=%g: raise it in the site file, or the reply's "
                    "timing may tell the coordinator about the number of records", name, policy.reply_after_s - left,
                    policy.reply_after_s)


def round_number(content: RecordDict) -> int:
    """The request's round number for the activity log; 0 when it has none that reads."""
    value = content.config_records.get(P.CONFIG, ConfigRecord()).get(P.SERVER_ROUND, 0)
    return value if type(value) is int else 0
