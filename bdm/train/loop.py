"""The training run: set-up (every check before any work), the step loop, logs, checkpoints, export."""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import state as S
from .config import TrainConfig, config_json
from .distributed import Dist, setup
from .ema import EMA
from ..formats.files import materialize
from .model import BridgeTrainingModel, compiled_loss, freeze
from .schedules import NoiseSchedule, lr_factor

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# -- models ----------------------------------------------------------------------------------------

def load_chinese_encoder(spec: str):
    """'toy', a Hugging Face Chinese CLIP folder, or a BDM file holding an encoder."""
    from ..text.chinese import ChineseTextEncoder
    if spec == "toy":
        return ChineseTextEncoder.tiny(0)
    path = Path(spec)
    if path.is_dir():
        return ChineseTextEncoder.from_hf_dir(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such Chinese text encoder (expected a Hugging Face Chinese CLIP "
                                "folder, a BDM file, or 'toy')")
    from ..formats.bdm_file import load_bdm
    bridge = load_bdm(path, with_text_encoder=True)
    return bridge.text_encoder


def make_optimizer(params, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if config.fused_adam:
        try:
            opt = torch.optim.AdamW(params, fused=True, **kwargs)
            if device.type == "cpu":  # a fused CPU kernel exists from torch 2.4; older ones raise here
                probe = torch.zeros(1, requires_grad=True)
                probe.grad = torch.zeros(1)
                torch.optim.AdamW([probe], fused=True, lr=0.0).step()
            return opt
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kwargs)


def make_scaler(mixed_precision: str, device: torch.device):
    if mixed_precision != "fp16":
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError, RuntimeError):
        return torch.cuda.amp.GradScaler(enabled=device.type == "cuda")


def peak_memory_gb(device: torch.device) -> float | None:
    """The run's peak memory in GiB: CUDA's allocator on a GPU; on a CPU the process's peak resident
    memory (POSIX getrusage, or psutil's peak working set on Windows); None where neither is available."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource  # POSIX only: imported here, so the trainer starts on Windows too
    except ImportError:
        try:
            import psutil
        except ImportError:
            return None
        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)  # Windows
        return peak / 2**30 if peak is not None else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


# -- the run ---------------------------------------------------------------------------------------

class Trainer:
    """One training run. `Trainer(config).run()`; attributes are public for tests."""

    def __init__(self, config: TrainConfig, dist: Dist | None = None):
        self.config = config.check()
        self.output = Path(config.output)
        self.dist = dist or setup(config.device)
        self.device = self.dist.device
        self.skipped: Counter = Counter()
        self.history: list[dict] = []

    # -- set-up -------------------------------------------------------------------------------
    def prepare(self) -> "Trainer":
        c, dist = self.config, self.dist
        # 1. cheap checks first: paths, data listing, resume target, optional packages
        if not Path(c.checkpoint).is_file():
            raise FileNotFoundError(f"{c.checkpoint}: no such backbone checkpoint")
        if c.init_bdm and not Path(c.init_bdm).is_file():
            raise FileNotFoundError(f"{c.init_bdm}: no such BDM file")
        if c.text_encoder and c.text_encoder != "toy" and not Path(c.text_encoder).exists():
            raise FileNotFoundError(f"{c.text_encoder}: no such Chinese text encoder (expected a Hugging Face "
                                    "Chinese CLIP folder, a BDM file, or 'toy')")
        self.resume_from = S.resolve_resume(c.resume, self.output) if c.resume else None
        self.data_kind, self.items, self.shards = self._list_data()
        sided = D.sided_captions(self.items) if c.random_flip and self.items else 0
        if sided and dist.main:
            print(f"warning: {sided} of {len(self.items)} captions name a side (左/右, left/right) and --random-flip "
                  "mirrors the pictures but not the captions; consider --no-random-flip", file=sys.stderr)
        self.tb = None
        if c.tensorboard and dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard") from None
            self._tb_class = SummaryWriter
        # 2. models
        from ..formats.checkpoint import load_checkpoint
        ckpt = load_checkpoint(c.checkpoint)  # refuses non-SD1.x families with a clear message
        self.backbone_name = ckpt.name
        init = None
        if c.init_bdm:
            from ..formats.bdm_file import load_bdm
            init = load_bdm(c.init_bdm, with_text_encoder=not c.text_encoder)
        chinese = load_chinese_encoder(c.text_encoder) if c.text_encoder else init.text_encoder
        if chinese is None:
            raise ValueError(f"{c.init_bdm}: holds no Chinese text encoder; give --text-encoder")
        weight_dtype = DTYPES[c.mixed_precision]
        english = ckpt.text_encoder.encode([""]).detach()  # the backbone's only context, computed once
        del ckpt.text_encoder
        from ..bridge import Bridge
        if init is not None:
            expected = ckpt.unet.config.with_context_dim(chinese.hidden_size)
            if init.config.unet != expected:
                raise ValueError(f"{c.init_bdm}: its branch ({init.config.unet}) does not fit this backbone "
                                 f"with a {chinese.hidden_size}-wide Chinese encoder ({expected})")
            bridge = init
        else:
            bridge = Bridge.from_backbone(ckpt.unet.float(), chinese.hidden_size)
        bridge = bridge.float().to(self.device).train()
        bridge.requires_grad_(True)
        bridge.gradient_checkpointing = c.gradient_checkpointing
        unet = freeze(ckpt.unet).to(self.device, weight_dtype)
        self.vae = freeze(ckpt.vae).to(self.device, weight_dtype)
        self.chinese = freeze(chinese).to(self.device, weight_dtype)
        self.model = BridgeTrainingModel(unet, bridge, english.to(self.device), c.checkpoint_backbone)
        self.bridge, self.unet, self.english = bridge, unet, english
        self.weight_dtype = weight_dtype
        self.schedule = NoiseSchedule(self.device)
        latent_factor = ckpt.vae.config.downscale
        levels = 2 ** (len(unet.config.channel_mult) - 1)
        if c.resolution % latent_factor or (c.resolution // latent_factor) % levels:
            raise ValueError(f"--resolution {c.resolution}: must be a multiple of {latent_factor * levels} "
                             "for this backbone (VAE downscale × UNet levels)")
        self.latent_size = c.resolution // latent_factor
        self.buckets, self.bucket_of = self._assign_buckets(latent_factor * levels)
        # 3. optimisation state
        self.optimizer = make_optimizer([p for p in bridge.parameters() if p.requires_grad], c, self.device)
        self.scaler = make_scaler(c.mixed_precision, self.device)
        self.ema = EMA(bridge, c.ema_decay) if c.ema else None
        self.step, self.position = 0, {"samples": 0, "workers": {}}
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        # 4. data (may build the latent cache: after the models, before the first step)
        self.loader = self._make_loader()
        self.total_steps = self._total_steps()
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # the branch has no buffers, so DDP's buffer syncing (its default) has nothing to do
            self.model.branch = DDP(bridge, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.graphed = None
        self.loss_fn = compiled_loss(self.model) if c.compile else self.model.loss
        if c.cuda_graphs and not c.compile:
            from .graphs import GraphedStep, graphs_possible
            why_not = graphs_possible(self.model, self.device, dist.enabled)
            if why_not is None:
                self.graphed = GraphedStep(self.model, None if c.mixed_precision == "no" else weight_dtype)
            elif self.device.type == "cuda" and dist.main:
                print(f"note: CUDA graphs off ({why_not})", file=sys.stderr)
        if dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
            if c.tensorboard:
                self.tb = self._tb_class(str(self.output / "tensorboard"))
        return self

    def _list_data(self):
        c = self.config
        if D.is_latent_cache(c.data):
            index = json.loads((Path(c.data) / D.CACHE_INDEX).read_text(encoding="utf-8"))
            if not index["images"]:
                raise ValueError(f"{c.data}: the latent cache holds no samples")
            return "latents", None, None
        shards = D.list_shards(c.data)
        if shards is not None:
            if c.cache_latents:
                raise ValueError("--cache-latents works with file/folder datasets; for WebDataset shards, train "
                                 "from the images")
            if c.aspect_buckets:
                raise ValueError("--aspect-buckets works with file/folder datasets and their latent caches; "
                                 "WebDataset shards are cropped to the square --resolution")
            return "shards", None, shards
        items, skipped = D.list_items(c.data)
        self.skipped.update(skipped)
        if not items:
            why = f" ({dict(skipped)} skipped)" if skipped else ""
            raise ValueError(f"{c.data}: the dataset is empty: no image with a caption{why}")
        return "files", items, None

    def _make_loader(self):
        c, dist = self.config, self.dist
        loader_kw = dict(num_workers=c.num_workers, pin_memory=self.device.type == "cuda",
                         persistent_workers=False)
        if c.num_workers > 0:
            loader_kw["prefetch_factor"] = 2
        if self.data_kind == "shards":
            start = self.position.get("workers", {}) if self._same_stream() else {}
            stream = D.ShardStream(self.shards, c.batch_size, c.resolution, c.center_crop, c.random_flip, c.seed,
                                   dist.rank, dist.world, c.num_workers, c.shuffle_buffer, start)
            return torch.utils.data.DataLoader(stream, batch_size=None, **loader_kw)
        if self.data_kind == "latents":
            dataset = D.LatentDataset(c.data, c.random_flip, c.seed)
        elif c.cache_latents:
            dataset = self._cached_dataset()
        else:
            dataset = D.ImageTextDataset(self.items, c.resolution, c.center_crop, c.random_flip, c.seed)
        self.dataset_size = len(dataset)
        start = self.position["samples"] // dist.world
        buckets, bucket_of = self.buckets, self.bucket_of
        if isinstance(dataset, D.LatentDataset):  # a cache knows its own buckets (bad images left out)
            buckets, bucket_of = dataset.buckets, dataset.bucket_of
            if c.aspect_buckets and not buckets and dist.main:
                print(f"note: {c.data} was cached without --aspect-buckets; training on its square latents",
                      file=sys.stderr)
        if buckets:
            batches = D.BucketBatchSampler(bucket_of, buckets, c.batch_size, c.seed, dist.rank, dist.world,
                                           start // c.batch_size)
            self.dataset_size = batches.per_rank * dist.world * c.batch_size  # with the buckets' fill-ups
            return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=D.collate, **loader_kw)
        sampler = D.EpochSampler(len(dataset), c.seed, dist.rank, dist.world, start)
        return torch.utils.data.DataLoader(dataset, batch_size=c.batch_size, sampler=sampler,
                                           collate_fn=D.collate, **loader_kw)

    def _assign_buckets(self, multiple: int):
        """With --aspect-buckets on a file/folder dataset: the bucket sizes and each image's bucket (from
        the image headers), printed as a histogram."""
        c = self.config
        if not c.aspect_buckets or self.data_kind != "files":
            return None, None
        buckets = D.bucket_sizes(c.resolution, multiple, c.bucket_max_ratio)
        from tqdm import tqdm
        bar = tqdm(total=len(self.items), desc="reading image sizes", leave=False,
                   disable=not (c.progress and self.dist.main))

        def size_of(item):  # each rank reads every world-th header; rank 0's bar counts for all
            bar.update(self.dist.world)
            return D.image_size(item.image)
        sizes = self.dist.map_split(size_of, self.items)
        bar.close()
        bucket_of = [D.nearest_bucket(size, buckets) for size in sizes]
        if self.dist.main:
            counts = Counter(bucket_of)
            print("aspect buckets (width×height: images): " + ", ".join(
                f"{w}×{h}: {counts[i]}" for i, (w, h) in enumerate(buckets) if counts[i]), file=sys.stderr)
        return buckets, bucket_of

    def _same_stream(self) -> bool:
        p = self.position
        same = p.get("world", self.dist.world) == self.dist.world and \
            p.get("num_workers", self.config.num_workers) == self.config.num_workers and \
            p.get("batch_size", self.config.batch_size) == self.config.batch_size
        if not same and self.dist.main:
            print("warning: world size, workers or batch size changed since the checkpoint; the shard streams "
                  "start over", file=sys.stderr)
        return same

    def _cached_dataset(self):
        c, dist = self.config, self.dist
        folder = Path(c.latent_cache) if c.latent_cache else self.output / "latents"
        from ..formats.files import short_hash
        vae_id = f"{Path(c.checkpoint).name}:{short_hash(c.checkpoint)}"
        if dist.main and not D.cache_matches(folder, self.items, c.resolution, c.random_flip, vae_id, self.buckets):
            with torch.autocast(self.device.type, DTYPES[c.mixed_precision], enabled=c.mixed_precision != "no"):
                _, skipped = D.build_latent_cache(folder, self.items, self.vae, c.resolution, c.center_crop,
                                                  c.random_flip, vae_id, self.device, self.weight_dtype,
                                                  batch_size=max(1, c.batch_size), progress=c.progress,
                                                  buckets=self.buckets, bucket_of=self.bucket_of)
            self.skipped.update(skipped)
        dist.barrier()
        dataset = D.LatentDataset(folder, c.random_flip, c.seed)
        if not len(dataset):
            raise ValueError(f"{c.data}: no readable image to cache")
        return dataset

    def _total_steps(self) -> int:
        c = self.config
        if c.max_steps is not None:
            return c.max_steps
        per_rank = self._epoch_samples() / self.dist.world
        return max(1, math.ceil(c.epochs * per_rank / (c.batch_size * c.gradient_accumulation)))

    def _epoch_samples(self) -> int:
        if self.data_kind != "shards":
            return self.dataset_size
        if not hasattr(self, "_shard_count"):
            self._shard_count = sum(1 for shard in self.shards for _ in D.shard_records(shard))
        return self._shard_count

    # -- state ------------------------------------------------------------------------------------
    def _load_state(self, folder: Path) -> None:
        state, tensors = S.load_checkpoint(folder)
        from ..formats.files import load_checked
        load_checked(self.bridge, S.sub_state(tensors, "bridge."), str(folder), "branch weights")
        if self.ema is not None:
            if state.get("ema") is None:
                self.ema = EMA(self.bridge, self.config.ema_decay)
            else:
                self.ema.load(S.sub_state(tensors, "ema."), state["ema"])
        S.load_optimizer(self.optimizer, tensors, state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        S.set_rng_state(tensors, state["rng"])
        self.step = int(state["step"])
        self.position = state["position"]
        if self.dist.main:
            print(f"resumed from {folder} at step {self.step}", file=sys.stderr)

    def current_position(self) -> dict:
        return {**self.position, "world": self.dist.world, "num_workers": self.config.num_workers,
                "batch_size": self.config.batch_size}

    def export(self, path: Path, notes: dict | None = None) -> Path:
        """The branch (EMA weights when EMA is on) + Chinese encoder as a BDM file."""
        from ..bridge import Bridge
        from ..formats.bdm_file import save_bdm
        bridge = self.bridge
        if self.ema is not None:
            bridge = self.ema.copy_to(materialize(lambda: Bridge(self.bridge.config)))
        notes = {"trained_by": "bdm.train", "step": self.step, "backbone": self.backbone_name,
                 "ema": self.ema is not None, **(notes or {})}
        return save_bdm(path, bridge, self.chinese, notes=notes, dtype=DTYPES[self.config.save_dtype])

    def save(self) -> Path:
        c = self.config
        root = self.output / "checkpoints"
        folder = S.save_checkpoint(
            root / S.checkpoint_name(self.step), step=self.step, bridge=self.bridge, ema=self.ema,
            optimizer=self.optimizer, scheduler={"step": self.step, "total": self.total_steps,
                                                 "lr": self.optimizer.param_groups[0]["lr"]},
            scaler=self.scaler, position=self.current_position(), config=json.loads(config_json(c)),
            export=self.export)
        S.prune_checkpoints(root, c.keep_checkpoints)
        return folder

    # -- one step ---------------------------------------------------------------------------------
    def batch_inputs(self, batch: dict):
        """(noisy latents, timesteps, Chinese context, target noise) of one micro-batch; every random draw
        comes from the sample's own generator (seed, epoch, key)."""
        c, dev = self.config, self.device
        keys, epochs = batch["key"].tolist(), batch["epoch"].tolist()
        gens = [torch.Generator().manual_seed(D.sample_seed(c.seed, e, k, 2)) for e, k in zip(epochs, keys)]
        shape = (4, self.latent_size, self.latent_size)
        with torch.no_grad():
            if "moments" in batch:
                mean, logvar = batch["moments"].to(dev).float().unbind(1)
            else:
                mean, logvar = self.vae.encode_moments(batch["image"].to(dev, self.weight_dtype))
                mean, logvar = mean.float(), logvar.float()
            shape = tuple(mean.shape[1:])
            draws = [(torch.randint(0, self.schedule.num_timesteps, (1,), generator=g),
                      torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand((), generator=g))
                     for g in gens]
            t = torch.cat([d[0] for d in draws]).to(dev)
            noise = torch.stack([d[1] for d in draws]).to(dev)
            posterior = torch.stack([d[2] for d in draws]).to(dev)
            z0 = (mean + torch.exp(0.5 * logvar) * posterior) * self.vae.config.scale_factor
            texts = ["" if float(d[3]) < c.caption_dropout else text for d, text in zip(draws, batch["text"])]
            chinese = self.chinese.encode(texts)
            z_t = self.schedule.add_noise(z0, noise, t)
        return z_t, t, chinese, noise

    def micro_step(self, batch: dict, sync: bool, accumulate: bool = False) -> float:
        """Forward and backward of one micro-batch; `accumulate`: not the first of its optimizer step."""
        c = self.config
        z_t, t, chinese, noise = self.batch_inputs(batch)
        if self.graphed is not None:  # forward and backward in one replay (never under DDP)
            factor = torch.full((), 1.0 / c.gradient_accumulation, device=self.device)
            return self.graphed(z_t, t, chinese, noise,
                                self.scaler.scale(factor) if self.scaler is not None else factor, accumulate).item()
        branch = self.model.branch
        ctx = branch.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
        with ctx:
            with torch.autocast(self.device.type, DTYPES[c.mixed_precision], enabled=c.mixed_precision != "no"):
                loss = self.loss_fn(z_t, t, chinese, noise)
            scaled = loss / c.gradient_accumulation
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.item()

    def optimizer_step(self) -> float:
        c = self.config
        params = [p for p in self.bridge.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
        factor = lr_factor(self.step, self.total_steps, c.lr_warmup_steps, c.lr_schedule, c.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = c.learning_rate * factor
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.graphed is None)  # a graph's gradients stay where they are
        if self.ema is not None:
            self.ema.update(self.bridge)
        return float(norm)

    def _take(self, it) -> dict:
        batch = next(it)
        for reason, _ in batch["skipped"]:
            self.skipped[reason] += 1
        if self.data_kind == "shards":
            worker, consumed = batch["position"]
            self.position.setdefault("workers", {})[str(worker)] = consumed
        self.position["samples"] = self.position.get("samples", 0) + len(batch["text"]) * self.dist.world
        return batch

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        if not hasattr(self, "model"):
            self.prepare()
        c, dist = self.config, self.dist
        if self.data_kind == "shards":  # the shard streams keep their own positions
            self.position["workers"] = {str(k): v for k, v in (self.loader.dataset.start or {}).items()}
        from tqdm import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (dist.main and c.progress),
                   desc="bdm.train", dynamic_ncols=True, file=sys.stderr)
        global_batch = c.batch_size * c.gradient_accumulation * dist.world
        it = iter(self.loader)
        window_loss, window_steps, t0 = 0.0, 0, time.perf_counter()
        log_path = self.output / "log.jsonl"
        try:
            while self.step < self.total_steps:
                losses = []
                for micro in range(c.gradient_accumulation):
                    batch = self._take(it)
                    losses.append(self.micro_step(batch, sync=micro == c.gradient_accumulation - 1,
                                                  accumulate=micro > 0))
                grad_norm = self.optimizer_step()
                self.step += 1
                loss = sum(losses) / len(losses)
                self.history.append({"step": self.step, "loss": loss})
                window_loss, window_steps = window_loss + loss, window_steps + 1
                elapsed = time.perf_counter() - t0
                mem = peak_memory_gb(self.device)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                sps=f"{window_steps * global_batch / max(elapsed, 1e-9):.1f}",
                                mem="n/a" if mem is None else f"{mem:.2f}G",
                                refresh=False)
                if self.step % max(1, c.log_every) == 0 or self.step == self.total_steps:
                    total_loss, n, skipped = dist.sum([window_loss, window_steps, sum(self.skipped.values())])
                    record = {"step": self.step, "loss": total_loss / max(n, 1) , "lr": self.optimizer.param_groups[0]["lr"],
                              "grad_norm": grad_norm, "it_per_s": window_steps / max(elapsed, 1e-9),
                              "samples_per_s": window_steps * global_batch / max(elapsed, 1e-9),
                              "peak_memory_gb": mem, "skipped": int(skipped),
                              "epoch": self.position.get("samples", 0) / max(1, self._epoch_samples())}
                    if dist.main:
                        with open(log_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
                        if self.tb is not None:
                            for k, v in record.items():
                                if k != "step" and v is not None:
                                    self.tb.add_scalar(f"train/{k}", v, self.step)
                    window_loss, window_steps, t0 = 0.0, 0, time.perf_counter()
                if c.validation_every and self.step % c.validation_every == 0:
                    self.validate()
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < self.total_steps:
                    self.checkpoint()
            self.checkpoint()
            if dist.main:
                final = self.export(self.output / "bdm.safetensors")
                if self.skipped:
                    print(f"skipped bad samples: {dict(self.skipped)}", file=sys.stderr)
                print(f"wrote {final}", file=sys.stderr)
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
        dist.barrier()
        return {"step": self.step, "history": self.history, "skipped": dict(self.skipped),
                "output": str(self.output / "bdm.safetensors")}

    def checkpoint(self) -> None:
        if self.dist.main:
            self.save()
        self.dist.barrier()

    def validate(self) -> None:
        if not self.dist.main:
            return
        from ..bridge import Bridge
        from .validate import generate, save_grid
        c = self.config
        bridge = (self.ema.copy_to(materialize(lambda: Bridge(self.bridge.config))).to(self.device)
                  if self.ema else self.bridge)
        was_training = bridge.training
        bridge.eval()
        try:
            with torch.autocast(self.device.type, DTYPES[c.mixed_precision], enabled=c.mixed_precision != "no"):
                # prompts and "" over the same chunks, as the official inference lays out prompt and negative
                both = self.chinese.encode(list(c.validation_prompts) + [""])
                chinese, uncond = both[:-1], both[-1:]
                images = generate(self.unet, self.vae, bridge, chinese, uncond, self.english, self.latent_size,
                                  c.validation_steps, c.validation_cfg, c.validation_sampler, seed=c.seed)
        finally:
            bridge.train(was_training)
        path = save_grid(images, self.output / "validation" / f"step-{self.step:07d}.png")
        if self.tb is not None:
            self.tb.add_images("validation", images, self.step)
        return path


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def train(config: TrainConfig) -> dict:
    """Train as `config` says; returns {step, history, skipped, output}."""
    dist = setup(config.device)
    try:
        seed_everything(config.seed, dist.rank)
        return Trainer(config, dist).run()
    finally:
        dist.close()
