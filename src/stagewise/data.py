"""Event banks and batches: events held in memory or streamed from their files, the order of
each epoch, the resumable batches of an epoch, and the simulator of signals plus noise.

StrainSimulator turns noise-free signals into training samples as batched tensor code: for
every sample the extrinsic parameters are drawn from their prior, the polarisations are
projected onto the detectors, scaled to the drawn network SNR (defined with the fiducial
ASD), whitened by an ASD (the fiducial one, or one drawn from the ASD set) and fresh white
noise is added. All of it runs on the training device, in the order: extrinsic
parameters, ASD indices, noise; with GNPE then the time proxies (see StrainSimulator.align).
"""

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import DTypeLike

from .config import Settings
from .detectors import Detectors
from .events import open_event_file, read_events, split_layout
from .priors import Prior, sample_priors

log = logging.getLogger(__name__)


def band_matrix(num_bins: int, num_bands: int) -> np.ndarray:
    """(F, num_bands) matrix averaging contiguous frequency bands."""
    matrix = np.zeros((num_bins, num_bands))
    for band, indices in enumerate(np.array_split(np.arange(num_bins), num_bands)):
        matrix[indices, band] = 1.0 / len(indices)
    return matrix


def shift_time(inputs: torch.Tensor, dt: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Frequency-domain data (B, D, 2, F) (real and imaginary parts) moved later in time by dt (B,) in s:
    each bin times exp(-2 pi i f dt), the phase worked out in float64. A signal simulated at time t comes
    out as the one simulated at t + dt, and white noise stays white noise of the same distribution."""
    data = torch.view_as_complex(inputs.transpose(-1, -2).contiguous())
    shifted = data * Detectors.time_shift(dt, frequencies, inputs.dtype)[:, None]
    return torch.view_as_real(shifted).transpose(-1, -2)


class StrainSimulator:
    """Whitened noisy detector data (B, D, 2, F) from polarisations (B, F).

    fiducial_asd: (D, F); asd_set: (M, D, F) or None. ASD features are the band
    averages of log(ASD / fiducial ASD), (B, D * num_asd_bands): zero for the fiducial ASD.
    gnpe_kernel: with GNPE, the half-width (s) of the uniform kernel of the time proxies; batches
    (__call__) are then aligned to them (align), while draw() gives the data as measured.
    """

    device: torch.device
    frequencies: torch.Tensor  # float64 (F,) in Hz
    detectors: Detectors
    extrinsic_priors: dict[str, Prior]
    fiducial_asd: torch.Tensor  # float32 (D, F)
    asd_set: torch.Tensor | None  # float32 (M, D, F)
    num_asd_bands: int
    bands: torch.Tensor  # float32 (F, num_asd_bands), band_matrix
    num_asd_features: int
    set_features: torch.Tensor | None  # (M, D * num_asd_bands), the ASD features of asd_set
    offset_over_fiducial: torch.Tensor  # complex128 (D, F)
    gnpe_kernel: float | None

    def __init__(self, frequencies: np.ndarray | torch.Tensor, detectors: Detectors, extrinsic_priors: dict[str, Prior],
                 fiducial_asd: np.ndarray | torch.Tensor, asd_set: np.ndarray | torch.Tensor | None, num_asd_bands: int,
                 device: str | torch.device, gnpe_kernel: float | None = None) -> None:
        self.device = torch.device(device)
        self.gnpe_kernel = gnpe_kernel
        self.frequencies = torch.as_tensor(frequencies, dtype=torch.float64, device=self.device)
        self.detectors = detectors
        self.extrinsic_priors = extrinsic_priors
        self.fiducial_asd = torch.as_tensor(fiducial_asd, dtype=torch.float32, device=self.device)
        self.asd_set = None if asd_set is None else torch.as_tensor(asd_set, dtype=torch.float32, device=self.device)
        self.num_asd_bands = num_asd_bands
        self.bands = torch.as_tensor(band_matrix(len(frequencies), num_asd_bands), dtype=torch.float32,
                                     device=self.device)
        self.num_asd_features = len(detectors.names) * num_asd_bands
        self.set_features = None if self.asd_set is None else self.asd_features(self.asd_set)
        offsets = detectors.offset_shift(self.frequencies, torch.float64) / self.fiducial_asd.double().cpu()
        self.offset_over_fiducial = offsets.to(self.device)

    def asd_features(self, asds: torch.Tensor) -> torch.Tensor:
        """The ASD features (B, D * num_asd_bands) of ASDs (B, D, F): band averages of log(ASD / fiducial)."""
        return (torch.log(asds.to(self.device, torch.float32) / self.fiducial_asd) @ self.bands).flatten(1)

    def whitened_signals(self, h_plus: torch.Tensor, h_cross: torch.Tensor, extrinsic: Mapping[str, torch.Tensor],
                         asds: torch.Tensor | None = None) -> torch.Tensor:
        """Noise-free strain (B, D, F) complex at the network SNR `extrinsic["snr"]` (defined with
        the fiducial ASD), divided by `asds` (B, D, F), by default by the fiducial ASD.

        The detectors' time offsets and the fiducial whitening are one (D, F) factor; the event's
        time shift has modulus 1 and leaves the SNR alone, so it comes last, with the SNR scale."""
        real = h_plus.real.dtype
        response = self.detectors.response(h_plus, h_cross, extrinsic["phase"])
        whitened = response * self.offset_over_fiducial.to(response.dtype)
        snr = torch.linalg.vector_norm(torch.view_as_real(whitened), dim=(1, 2, 3))
        scale = extrinsic["snr"].to(self.device, real) / snr
        shift = self.detectors.time_shift(extrinsic["time"].to(self.device), self.frequencies, real, scale)
        whitened.mul_(shift[:, None])
        return whitened if asds is None else whitened.mul_(self.fiducial_asd / asds)

    def __call__(self, h_plus: torch.Tensor, h_cross: torch.Tensor, intrinsic: Mapping[str, torch.Tensor | np.ndarray],
                 generator: torch.Generator,
                 asd: str = "fiducial") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One batch: (parameters {name: float64 (B,)}, inputs float32 (B, D, 2, F), asd_features (B, A)),
        aligned to GNPE proxies when the simulator has a kernel."""
        parameters, inputs, features, _ = self.draw(h_plus, h_cross, intrinsic, generator, asd)
        if self.gnpe_kernel is not None:
            parameters, inputs = self.align(parameters, inputs, generator)
        return parameters, inputs, features

    def proxies(self, time: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """GNPE proxies t_hat = time + eps, eps uniform on [-gnpe_kernel, gnpe_kernel]: float64 (B,)."""
        assert self.gnpe_kernel is not None  # proxies exist only with GNPE
        eps = torch.rand(len(time), generator=generator, dtype=torch.float64, device=self.device)
        return time.to(self.device, torch.float64) + self.gnpe_kernel * (2 * eps - 1)

    def align(self, parameters: Mapping[str, torch.Tensor], inputs: torch.Tensor,
              generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """GNPE: draw a proxy t_hat for every sample, move its data by -t_hat and make its time label the
        offset time - t_hat, which is what the network infers. Returns (parameters, inputs)."""
        proxies = self.proxies(parameters["time"], generator)
        shifted = shift_time(inputs, -proxies, self.frequencies)
        return {**parameters, "time": parameters["time"] - proxies}, shifted

    def draw(self, h_plus: torch.Tensor, h_cross: torch.Tensor, intrinsic: Mapping[str, torch.Tensor | np.ndarray],
             generator: torch.Generator,
             asd: str = "fiducial") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """As __call__, plus the ASD (B, D, F) that whitened each sample."""
        batch = h_plus.shape[0]
        extrinsic = sample_priors(self.extrinsic_priors, batch, generator)
        if asd == "set":
            assert self.asd_set is not None and self.set_features is not None  # asd "set" needs the ASD set
            index = torch.randint(len(self.asd_set), (batch,), generator=generator, device=self.device)
            asds, features = self.asd_set[index], self.set_features[index]
        else:
            asds = self.fiducial_asd.expand(batch, -1, -1)
            features = torch.zeros(batch, self.num_asd_features, device=self.device)
        whitened = self.whitened_signals(h_plus, h_cross, extrinsic, asds if asd == "set" else None)
        noise = torch.randn((*whitened.shape[:2], 2, whitened.shape[2]), generator=generator, device=self.device)
        inputs = noise.add_(torch.view_as_real(whitened).transpose(-1, -2))
        parameters = {**{k: torch.as_tensor(v, device=self.device) for k, v in intrinsic.items()}, **extrinsic}
        return parameters, inputs, features, asds


class EpochBatches:
    """Batches made lazily as make_batch(index, generator) from a list of index tensors.

    The indices (the epoch's data order) must come from a fresh generator seeded by
    the epoch, drawn before any batch is made; the rest of that generator's stream
    feeds the batches. `position()` after step k and `resume(position)` on a new
    instance continue the stream exactly where it stopped.
    """

    indices: list[torch.Tensor]
    make_batch: Callable[[torch.Tensor, torch.Generator], Any]
    generator: torch.Generator
    step: int  # batches made so far

    def __init__(self, indices: Iterable[torch.Tensor], make_batch: Callable[[torch.Tensor, torch.Generator], Any],
                 generator: torch.Generator) -> None:
        self.indices, self.make_batch, self.generator = list(indices), make_batch, generator
        self.step = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        while self.step < len(self.indices):
            batch = self.make_batch(self.indices[self.step], self.generator)
            self.step += 1
            yield batch

    def position(self) -> dict[str, Any]:
        """The number of batches made so far and the generator's state after them."""
        return {"step": self.step, "generator": self.generator.get_state()}

    def resume(self, position: Mapping[str, Any]) -> None:
        self.step = position["step"]
        self.generator.set_state(position["generator"])


class EpochOrder:
    """The order of a split's events in each epoch, shuffled in buffers of whole blocks.

    The split is cut into blocks of `block_events` contiguous events (a block never
    crosses a file). An epoch permutes the blocks, groups them into buffers of
    `buffer_blocks` blocks and permutes the events within each buffer; a split that
    fits one buffer is simply permuted as a whole. The order depends only on the
    generator and these sizes, never on what is held in memory.
    """

    blocks: list[tuple[int, int, int]]  # (file, start, stop) of each block
    offsets: np.ndarray  # (number of files + 1,): the index of each file's first event, then the total
    starts: torch.Tensor  # (number of blocks + 1,): the index of each block's first event, then the total
    buffer_blocks: int

    def __init__(self, sizes: Sequence[int], block_events: int, buffer_blocks: int) -> None:
        self.blocks = [(file, start, min(start + block_events, n))
                       for file, n in enumerate(sizes) for start in range(0, n, block_events)]
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))
        self.starts = torch.tensor([self.offsets[f] + a for f, a, _ in self.blocks] + [self.offsets[-1]])
        self.buffer_blocks = buffer_blocks

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batches(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Index tensors of one epoch (the last may be short), drawn from `generator`."""
        device = generator.device
        if self.buffer_blocks >= len(self.blocks):
            return torch.split(torch.randperm(len(self), generator=generator, device=device), batch_size)
        parts: list[torch.Tensor] = []
        for group in torch.randperm(len(self.blocks), generator=generator, device=device).split(self.buffer_blocks):
            # torch.arange takes 0-d tensors as bounds, though its stubs say numbers
            index = torch.cat([torch.arange(self.starts[b], self.starts[b + 1], device=device)  # type: ignore[call-overload]
                               for b in group.tolist()])
            parts.append(index[torch.randperm(len(index), generator=generator, device=device)])
        return torch.split(torch.cat(parts), batch_size)


def memory_dtype(dtype: DTypeLike) -> torch.dtype:
    """How event data of numpy `dtype` is held: complex as complex64, real as float32."""
    return torch.complex64 if np.dtype(dtype).kind == "c" else torch.float32


def _as_tensors(labels: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray],
                device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """labels as float64 and data as memory_dtype, on `device`."""
    return ({k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in labels.items()},
            {k: torch.as_tensor(v, dtype=memory_dtype(v.dtype), device=device) for k, v in data.items()})


class EventBank:
    """Events held in memory on the training device: labels {name: float64 (N,)} and data
    {name: (N, ...)}, complex arrays as complex64 and real ones as float32."""

    labels: dict[str, torch.Tensor]
    data: dict[str, torch.Tensor]
    order: EpochOrder

    def __init__(self, labels: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray], device: str | torch.device,
                 order: EpochOrder | None = None) -> None:
        self.labels, self.data = _as_tensors(labels, data, device)
        self.order = order or EpochOrder([len(self)], max(len(self), 1), 1)

    def __len__(self) -> int:
        return next(iter(self.data.values())).shape[0]

    def take(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(labels, data) of the events at `index`."""
        return {k: v[index] for k, v in self.labels.items()}, {k: v[index] for k, v in self.data.items()}

    def epoch(self, batch_size: int, generator: torch.Generator,
              make_batch: Callable[[torch.Tensor, torch.Generator], Any]) -> EpochBatches:
        """The batches of one epoch in the random order of `generator`: a sized iterable of
        make_batch(index, generator)."""
        return EpochBatches([i.to(self.device) for i in self.order.batches(batch_size, generator)], make_batch,
                            generator)

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device


class StreamedEventBank(EventBank):
    """Events read from their files block by block, for a split larger than memory.

    `take` reads the blocks an index needs with contiguous h5py reads and keeps up to
    `capacity` blocks (one shuffle buffer); when more are needed, the blocks the index
    does not touch are dropped, so a batch that spans two buffers holds at most two.
    Batches are the same as an EventBank's of the same files and order.
    """

    paths: list[str | Path]
    label_names: list[str]
    data_keys: list[str]
    capacity: int  # blocks held at most
    starts: torch.Tensor  # order.starts on the device
    cache: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]  # block -> its (labels, data)
    reads: int  # blocks read so far
    shapes: dict[str, tuple[int, ...]]  # data key -> shape of one event
    dtypes: dict[str, torch.dtype]  # data key -> memory_dtype

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[str], data_keys: Sequence[str],
                 per_event: Mapping[str, tuple[tuple[int, ...], np.dtype]], order: EpochOrder, capacity: int,
                 device: str | torch.device) -> None:
        self.paths, self.label_names, self.data_keys = list(paths), list(labels), list(data_keys)
        self.order, self.capacity, self._device = order, capacity, torch.device(device)
        self.starts = order.starts.to(self._device)
        self.cache = {}
        self.reads = 0
        self.shapes = {k: shape for k, (shape, _) in per_event.items()}
        self.dtypes = {k: memory_dtype(dtype) for k, (_, dtype) in per_event.items()}

    def __len__(self) -> int:
        return len(self.order)

    @property
    def device(self) -> torch.device:
        return self._device

    def take(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        block = torch.searchsorted(self.starts, index, right=True) - 1
        needed = torch.unique(block).tolist()
        missing = [b for b in needed if b not in self.cache]
        if len(self.cache) + len(missing) > self.capacity:
            self.cache = {b: v for b, v in self.cache.items() if b in needed}
        for b, tensors in zip(missing, self._read(missing), strict=True):
            self.cache[b] = tensors
        labels = {k: torch.empty(len(index), dtype=torch.float64, device=self.device) for k in self.label_names}
        data = {k: torch.empty((len(index), *self.shapes[k]), dtype=self.dtypes[k], device=self.device)
                for k in self.data_keys}
        for b in needed:
            where = block == b
            local = index[where] - self.starts[b]
            block_labels, block_data = self.cache[b]
            for out, source in ((labels, block_labels), (data, block_data)):
                for k in out:
                    out[k][where] = source[k][local]
        return labels, data

    def _read(self, blocks: list[int]) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """[(labels, data)] of the given blocks as tensors, one contiguous read per dataset and block."""
        out: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        by_file: dict[int, list[int]] = {}
        for b in blocks:
            by_file.setdefault(self.order.blocks[b][0], []).append(b)
        for file, group in by_file.items():
            with open_event_file(self.paths[file]) as f:
                for b in group:
                    _, start, stop = self.order.blocks[b]
                    out[b] = _as_tensors({k: f["labels"][k][start:stop] for k in self.label_names},
                                         {k: f["data"][k][start:stop] for k in self.data_keys}, self.device)
                    self.reads += 1
        return [out[b] for b in blocks]


def event_bank(paths: Sequence[str | Path], labels: Sequence[str], data_keys: Sequence[str], shuffle: Settings,
               memory_limit_mb: float, device: str | torch.device) -> EventBank:
    """The events of a training or validation split: in memory when they take at most
    `memory_limit_mb`, otherwise streamed from the files in blocks.

    shuffle: {block_events, buffer_mb} (config `data.shuffle`); streaming holds at most two
    shuffle buffers at once."""
    sizes, per_event = split_layout(paths, data_keys)
    event_bytes = 8 * len(labels) + sum(int(np.prod(shape)) * memory_dtype(dtype).itemsize
                                        for shape, dtype in per_event.values())
    buffer_blocks = max(1, int(shuffle["buffer_mb"] * 2**20 // (shuffle["block_events"] * event_bytes)))
    order = EpochOrder(sizes, shuffle["block_events"], buffer_blocks)
    total_mb = sum(sizes) * event_bytes / 2**20
    if total_mb <= memory_limit_mb:
        return EventBank(*read_events(paths, labels, data_keys), device, order)
    log.info("%.0f MB of events in %d files exceed local.memory_limit_mb (%s MB): streaming them in blocks of %d "
             "events, shuffled in buffers of %d blocks", total_mb, len(paths), memory_limit_mb,
             shuffle["block_events"], buffer_blocks)
    return StreamedEventBank(paths, labels, data_keys, per_event, order, buffer_blocks, device)
