"""One line of help per ``--set`` key of :class:`~meanflow.config.schema.TrainConfig`: the
"meaning" column of docs/configuration.md (``scripts/config_doc.py``; a test checks that every
key has one)."""

KEY_HELP = {
    "data": "built-in distribution, image dataset (fashion-mnist, digits, cifar10), folder or "
    ".npy/.npz path (`--data`); see docs/data.md",
    "preset": "name of the preset applied (`--preset`)",
    "objective": "`meanflow`, `flow-matching`, `imf` (improved MeanFlow) or `alphaflow` "
    "(`--objective`; docs/method.md)",
    "steps": "optimizer steps in total (`--steps`)",
    "batch_size": "samples per step (`--batch-size`)",
    "seed": "seed of initialization, data order, noise and times (`--seed`)",
    "num_data": "points drawn from a built-in distribution as the training set",
    "normalize": "standardize each dimension with the training set's mean and std; samples "
    "are mapped back",
    "ema_decay": "decay of the primary EMA, the weights sampling uses (warmed up as min(decay, "
    "(1+n)/(10+n)) unless ema_warmup=false); the authors use 0.9999 (ImageNet and "
    "CIFAR-10)",
    "ema_extra": "extra EMAs kept beside the primary, comma-separated decays (e.g. "
    '"0.99995,0.9996", the authors\' CIFAR-10 extras; their demo reports FID '
    "with 0.99995); sample one with `--weights 0.99995` (docs/reliability.md)",
    "ema_every": "update the EMAs every k optimizer steps with decay^k applied to the current "
    "weights (the authors' CIFAR-10 code: 16; their ImageNet code: 1)",
    "ema_warmup": "warm the decay up as min(decay, (1+n)/(10+n)); false: constant decay from "
    "step 1, as the authors",
    "log_every": "steps between metrics.jsonl records",
    "ckpt_every": "steps between checkpoints (one is always written at the end)",
    "keep_checkpoints": "newest checkpoints kept in checkpoints/",
    "sample_num": "points in samples-1step.png of vector runs, written at the end of training",
    "data_dir": "folder holding the fashion-mnist IDX or cifar10 binary files (`--data-dir`)",
    "image_size": "resize folder images to this square size; digits size 8, 16 or 32 "
    "(0: native; digits 16)",
    "hflip": "flip each training sample horizontally with probability 1/2: images are "
    "mirrored, latents take their stored mirror encoding (`latents encode --flip`); off in "
    "the ImageNet presets, as the MeanFlow authors train",
    "augment": "EDM's augmentation pipeline: `edm-cifar10` (the authors' CIFAR-10 setting, "
    "docs/augmentation.md) or empty; its labels condition the network (SongUNet)",
    "augment_p": "augmentation probability p of the pipeline (the authors: 0.12)",
    "conditional": "train class-conditional when the data has labels (`--unconditional` sets "
    "false)",
    "data_shape": "one sample's shape, D or CxHxW; set from the data (presets give it for "
    "`--dry-run` without data)",
    "num_classes": "classes of a conditional run; set from the data (0: unconditional)",
    "grid_every": "steps between sample grids samples/step-N.png of image runs, from fixed "
    "noise (0: only at the end)",
    "grid_num": "images in each sample grid (one row per class when conditional)",
    "grad_accum": "split each batch into this many micro-batches whose gradients add up "
    "(the same objective per sample; less memory per pass)",
    "max_bad_steps": "this many non-finite steps in a row stop the run (with a diagnostic and "
    "the last good state saved); each one is skipped and counted",
    "tensorboard": "also log losses, gradient norm and grids to RUN/tensorboard (`pip install "
    "tensorboard`)",
    "precision": "`fp32`, or `bf16`: the network runs under bf16 autocast with fp32 master "
    "weights (the JVP stays fp32 unless loss.jvp_dtype=autocast)",
    "init": "start the network from the EMA weights of this run directory (or exported "
    "model) instead of random: step 0, a fresh optimizer, e.g. a flow-matching run fine-tuned "
    "into MeanFlow (`--init`; docs/onestep.md)",
    "compile": "torch.compile the network (eager JVP around it; docs/distributed.md)",
    "tf32": "allow TF32 matrix products on CUDA (no effect on CPU)",
    "stream": "read batches from disk through DataLoader workers instead of holding the data "
    "set in memory (image folders; latent directories always stream)",
    "workers": "DataLoader worker processes of a streamed run (0: in the training process)",
    "model.arch": "network: `mlp` (vectors), `unet`, `songunet` (the authors' CIFAR-10 "
    "DDPM++ U-Net) or `dit` (images, latents)",
    "model.hidden": "MLP width",
    "model.depth": "MLP hidden layers",
    "model.size": "U-Net config (tiny, small, cifar10-paper) or DiT SIZE/PATCH (T, S, B, M, L, "
    "XL; e.g. B/2); see docs/networks.md",
    "model.channels": "U-Net base channels (0: the config's)",
    "model.blocks": "U-Net ResBlocks per level (0: the config's)",
    "model.dropout": "U-Net dropout (-1: the config's)",
    "model.aux_head": "imf: the authors' auxiliary velocity head, a second network output v "
    "that gives iMF's JVP tangent and guidance terms and has its own loss (mlp, unet, dit; "
    "unused at sampling); false: the parameter-free tangent u(z, t, t)",
    "model.z_features": "mlp: K Fourier features sin/cos(2^k z), k = 0..K-1, beside z "
    "(steeper one-step maps between separated modes; docs/onestep.md)",
    "model.aux_depth": "dit with model.aux_head: last blocks branched into each head (the "
    "authors' B/2: 8 of 12; 0: a second final layer only)",
    "model.time_input": "time quantities the MLP sees: `t,t-r`, `t,r`, `t,r,t-r`, `t-r` "
    "(paper Table 1c; image networks embed t, t-r)",
    "model.time_dim": "sinusoidal features per time quantity",
    "time.dist": "`logit-normal` or `uniform`",
    "time.mean": "logit-normal mean of t (and of r unless time.r_mean is set)",
    "time.std": "logit-normal std of t (and of r unless time.r_std is set)",
    "time.r_mean": "logit-normal mean of r's draw (None: same as t)",
    "time.r_std": "logit-normal std of r's draw (None: same as t)",
    "time.ratio": "fraction of samples with r != t (0: flow-matching targets only)",
    "time.order": "`sorted` (t = max, r = min of the two draws; the paper's) or `official-v1` "
    "(t unsorted, mask, then r = min(t, r): the authors' improved CIFAR-10 "
    "sampler; docs/method.md)",
    "time.mix": "fraction of rows whose two time draws are uniform on [0, 1] instead (trains "
    "every (r, t) pair a k-step sampler uses; docs/onestep.md)",
    "time.ratio_start": "r != t share at the first step (at most time.ratio), moving linearly "
    "to time.ratio at the last (negative: time.ratio throughout; docs/onestep.md)",
    "time.flat": "time of the r = t rows: `max` (t = max of the two draws, the authors') or "
    "`single` (one draw of the t law, flow matching's; docs/onestep.md)",
    "loss.p": "adaptive weight power, loss = err / sg((err + c)^p); 0 is the plain squared error",
    "loss.c": "adaptive weight constant c",
    "loss.self_velocity": "share beta of the network's own velocity u(z, t, t) in the r != t "
    "rows' tangent and target, (1 - beta) v + beta u; 1 is self-distillation (docs/onestep.md)",
    "loss.jvp": "`subset` (JVP only on r != t samples, its output reused for the loss), "
    "`full` (whole batch, as the authors' code) or `detached` (JVP without graph, "
    "then one plain forward; fastest, see docs/method.md); same loss and gradients",
    "loss.jvp_dtype": "`float32` (default: the JVP with autocast off, as the authors) or "
    "`autocast` (the JVP in the run's precision, e.g. bf16)",
    "loss.jvp_backend": "how du/dt is computed: `forward-ad` (default, dual tensors), `func` "
    "(torch.func.jvp, same numbers) or `finite-difference` (1-2 extra no-grad "
    "forwards, approximate; refused with dropout; docs/method.md)",
    "loss.tangent": "JVP tangent on (z, r, t): `v,0,1` (default, the MeanFlow identity's), or "
    "`v,0,0`, `v,1,0`, `v,1,1` for the paper's ablation (Table 1b)",
    "loss.fd_step": "finite-difference step h (0: 1e-3 forward, 3e-3 central; measured)",
    "loss.fd_scheme": "finite-difference scheme: `forward` (1 extra forward) or `central` (2)",
    "optim.fused": "fused Adam kernel: `auto` (on CUDA), `on`, `off`",
    "optim.name": "`adam` or `adamw`",
    "optim.lr": "peak learning rate",
    "optim.beta1": "Adam beta1",
    "optim.beta2": "Adam beta2",
    "optim.weight_decay": "weight decay (decoupled for adamw)",
    "optim.grad_clip": "clip the gradient norm to this value (0: off; the norm is logged)",
    "optim.schedule": "`constant`, or `cosine` decay to 0 at the last step (resuming with a "
    "larger --steps stretches the cosine)",
    "optim.warmup": "linear warm-up steps",
    "alpha.start": "AlphaFlow: alpha before the window (1: trajectory flow matching)",
    "alpha.end": "AlphaFlow: alpha after the window (0: MeanFlow)",
    "alpha.gamma": "AlphaFlow: steepness of the sigmoid from start to end",
    "alpha.begin": "AlphaFlow: window start, as a fraction of the run",
    "alpha.finish": "AlphaFlow: window end, as a fraction of the run",
    "alpha.snap": "AlphaFlow: alpha below snap becomes 0, above 1 - snap becomes 1",
    "guidance.omega": "guidance weight omega on the conditional velocity; effective CFG scale "
    "omega / (1 - kappa) (conditional runs)",
    "guidance.kappa": "guidance mixing kappa on u(z, t, t | y) (0: the plain form)",
    "guidance.t_min": "guidance applies for t_min <= t <= t_max (with guidance.inputs: the "
    "interval sampling uses)",
    "guidance.t_max": "guidance applies for t_min <= t <= t_max (with guidance.inputs: the "
    "interval sampling uses)",
    "guidance.label_dropout": "probability of replacing a label by the null label",
    "guidance.inputs": "imf: the guidance scale and interval are network inputs, drawn per row "
    "in training (omega log-uniform on [1, omega_max], t_min ~ U(0, 0.5), "
    "t_max ~ U(0.5, 1)); sampling picks omega (`--guidance W`) and the "
    "interval [t_min, t_max] in one evaluation",
    "guidance.omega_max": "imf with guidance.inputs: the largest omega drawn in training",
    "guidance.drop_rows": "`r=t` (default, the authors': the null-label rows are r = t rows, "
    "label_dropout of the batch) or `any` (each row independently)",
}
