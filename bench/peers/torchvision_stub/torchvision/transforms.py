class Compose:
    """torchvision.transforms.Compose: apply the transforms in order."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, sample):
        for transform in self.transforms:
            sample = transform(sample)
        return sample
