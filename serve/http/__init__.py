"""The HTTP face: Falcon routes (/predict, /v2, the repository API, probes, the page) that parse
a request, hand it to the core's Handler and encode its answer."""
