"""Training side of whatcar: fit a fastai Learner and turn it into a TorchScript artifact."""
