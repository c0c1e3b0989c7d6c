"""/metrics of an app under test, read back with prometheus_client's own text parser."""

from prometheus_client.parser import text_string_to_metric_families


def scrape(client) -> dict:
    """Every sample as {(name, frozenset of labels): value}."""
    resp = client.simulate_get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, metric: str, **labels) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)
