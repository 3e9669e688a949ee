"""The batches of one epoch, resumable at any step."""


class EpochBatches:
    """Batches made lazily as make_batch(index, generator) from a list of index tensors.

    The indices (the epoch's data order) must come from a fresh generator seeded by
    the epoch, drawn before any batch is made; the rest of that generator's stream
    feeds the batches. `position()` after step k and `resume(position)` on a new
    instance continue the stream exactly where it stopped.
    """

    def __init__(self, indices, make_batch, generator):
        self.indices, self.make_batch, self.generator = list(indices), make_batch, generator
        self.step = 0

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        while self.step < len(self.indices):
            batch = self.make_batch(self.indices[self.step], self.generator)
            self.step += 1
            yield batch

    def position(self):
        """The number of batches made so far and the generator's state after them."""
        return {"step": self.step, "generator": self.generator.get_state()}

    def resume(self, position):
        self.step = position["step"]
        self.generator.set_state(position["generator"])
