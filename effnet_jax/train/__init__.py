"""Fine-tuning: the run's config (`config`), what it builds (`build`), the steps, the optimizer, the epoch loop
(`loop`), the run directory, the devices and the stop signals."""
