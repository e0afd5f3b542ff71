"""A seconds-long pipeline for tests and smoke runs: tiny data, tiny models, one epoch each."""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.data.num_train = 300
  config.data.num_test = 100
  config.log_every_steps = 5
  config.model.width = 0.25
  config.classifier.num_epochs = 2
  config.classifier.batch_size = 50
  config.classifier.lr_decay_epochs = (1,)
  config.craft.steps = 2
  config.craft.batch_size = 100
  config.denoiser.width = 0.125
  config.denoiser.discriminator_width = 0.25
  config.denoiser.num_epochs = 1
  config.denoiser.batch_size = 50
  config.denoiser.lr_decay_epochs = ()
  config.eval.batch_size = 100
  config.eval.pgd.steps = 2
  config.eval.caf.steps = 2
  # A couple of iterations each, so tests can run every registered attack end to end.
  for name in ("mifgsm", "pgd_l2", "cw", "ddn", "apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "sta",
               "wasserstein"):
    config.eval[name].steps = 2
  config.eval.cw.binary_search_steps = 1
  config.eval.apgd_t.n_target_classes = config.eval.fab_t.n_target_classes = 2
  config.eval.square.n_queries = 10
  config.eval.autoattack.update(dict(steps=2, n_target_classes=2, square_queries=10))
  config.eval.wasserstein.sinkhorn_iters = 5
  return config
