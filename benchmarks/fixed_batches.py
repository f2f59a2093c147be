"""A store that serves pre-drawn batches in a loop, so benchmarks time the SAE step without the model."""


class FixedBatches:
    def __init__(self, batches):
        self.batches, self.i, self.batch_size = batches, 0, len(batches[0])

    def next_batch(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]
