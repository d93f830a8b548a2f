"""Requests of several clients answered by one private computation.

`share(..., max_requests=N)` lets the server take every request waiting, up
to N, and answer them with one pass: the smallest of `pass_sizes(N)` that
holds them, padded with zeros. Each client must still get exactly its own
answer, and a lone request must still get the single-request pass.
"""
import re
import textwrap

import numpy as np
import pytest

from conftest import LOGIT_TOLERANCE, run_on_fresh_cluster
from helpers.serving import pass_sizes

pytestmark = pytest.mark.integration


def test_pass_sizes_double_up_to_the_most():
    assert pass_sizes(1) == (1,)
    assert pass_sizes(2) == (1, 2)
    assert pass_sizes(4) == (1, 2, 4)
    assert pass_sizes(6) == (1, 2, 4, 6)


def test_max_requests_must_be_a_whole_number_of_at_least_one():
    from helpers import SharedModel

    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_requests"):
            SharedModel(None, None, max_requests=bad)


# Three clients' requests wait before the server starts, so its first look
# finds all three: they must be answered together by the pass for four (one
# padding slot), each with its own logits. Then a fourth client asks three
# times, alone: each request gets the single-request pass, without waiting
# for the three others (they are no longer recent).
WAITING_REQUESTS = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np
    from helpers import TFECluster, TFEWorker, load_mnist, share
    from helpers.models import as_model_input, plaintext_logits, seed_cnn

    weights, protocol = sys.argv[2], sys.argv[3]
    images = as_model_input(load_mnist()[1][0][:4])
    plain = plaintext_logits(weights, images)  # before connecting
    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    model = seed_cnn(batch_size=1)
    model.load_weights(weights)
    shared = share(model, cluster, protocol=protocol, max_requests=4)
    # So that the clients connect; serve() starts later, on purpose.
    shared.channel.announce(shared._open_relay().address)
    clients = []
    for _ in range(4):
        client = TFEWorker()
        client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
        clients.append(client)
    answers = {}

    def ask(i):
        answers[i] = clients[i].query_model(images[i:i + 1], timeout=120)[0]

    asking = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in asking:
        thread.start()
    deadline = time.monotonic() + 60
    while shared._relay.waiting() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("WAITING", shared._relay.waiting(), flush=True)
    serving = threading.Thread(target=shared.serve, kwargs=dict(num_requests=6, timeout=120))
    serving.start()
    for thread in asking:
        thread.join(120)
    time.sleep(1.5)  # the three others are no longer recent: client 3 is alone now
    lone = []
    for _ in range(3):  # alone, one after another
        ask(3)
        lone.append(answers[3])
    serving.join(120)
    shared.stop()
    print("PASSES", sorted(shared._pass_seconds))
    print("LONE", max(float(np.abs(a - plain[3]).max()) for a in lone))
    print("RESULT", json.dumps({i: [a.tolist(), plain[i].tolist()] for i, a in answers.items()}))
""")


@pytest.mark.parametrize("protocol", ["securenn", "aby3"])
def test_waiting_requests_are_answered_together_each_with_its_own_answer(tmp_path, seed_weights,
                                                                         protocol):
    proc = run_on_fresh_cluster(WAITING_REQUESTS, tmp_path, seed_weights, protocol, timeout=600)
    out = proc.stdout
    assert "WAITING 3" in out, out + proc.stderr[-2000:]
    assert "up to 4 requests answered together" in out
    assert re.search(r"requests 1 to 3 answered together", out), out
    assert re.search(r"request +4 answered in", out), out
    assert re.search(r"request +6 answered in", out), out
    assert re.search(r"request +5 answered in", out), out
    assert "PASSES [1, 4]" in out, out  # the three together, then the lone ones alone
    assert float(out.split("LONE")[1].split()[0]) < LOGIT_TOLERANCE
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert result, proc.stderr[-2000:]
    import json

    answers = json.loads(result[0][len("RESULT "):])
    assert sorted(answers) == ["0", "1", "2", "3"]
    for private, plain in answers.values():
        private, plain = np.array(private), np.array(plain)
        # Its own image's logits: the four test images have different classes,
        # so an answer that went to the wrong client would be far off.
        assert np.abs(private - plain).max() < LOGIT_TOLERANCE
        assert private.argmax() == plain.argmax()
    classes = {int(np.argmax(plain)) for _, plain in answers.values()}
    assert len(classes) == 4  # the check above can tell the answers apart
