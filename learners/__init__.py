"""What a trained learner is, for both the stage that makes it (train/) and the one that turns it
into an artifact (export/): its pickle and the versions sidecar beside it (learner.py), and its
class names parsed into make, model, body style and year (classnames.py).

train/ and export/ both import this package; neither imports the other.
"""
