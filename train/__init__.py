"""Training: fine-tune a fastai Learner on a folder of class-named photo folders (`make train`).

cli.py holds the recipe and the run, checkpoint.py what a run saves after every epoch,
progress.py the time estimates, datafolder.py the checks before any epoch, stages.py the
callbacks (progressive resizing, weight averaging), backbones.py the packaged ImageNet weights.
Its output, `export.pkl`, is what export/ turns into a served artifact.
"""
