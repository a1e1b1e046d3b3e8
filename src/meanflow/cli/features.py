"""``meanflow features train``: the classifier whose penultimate layer is the feature space of
FD-FMNIST / FD-digits (docs/evaluation.md)."""

from __future__ import annotations

import json
import os

from ..errors import check


def add_features_parser(sub) -> None:
    """Register ``meanflow features`` on the sub-command set ``sub``."""
    p = sub.add_parser(
        "features",
        help="train a feature network for FD on small images",
        description="Feature networks give Frechet distances and precision/"
        "recall on small images (FD-FMNIST, FD-digits); see "
        "docs/evaluation.md.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser(
        "train",
        help="train a classifier whose penultimate layer is the "
        "feature space; prints its test accuracy",
    )
    t.add_argument(
        "--data",
        required=True,
        metavar="NAME_OR_PATH",
        help="labelled image data: fashion-mnist, digits, or a folder of class folders",
    )
    t.add_argument("--data-dir", metavar="DIR", help="folder of the fashion-mnist IDX files")
    t.add_argument(
        "--image-size",
        type=int,
        default=0,
        metavar="S",
        help="resize folder images / digits size (as for train)",
    )
    t.add_argument(
        "--out",
        required=True,
        metavar="FILE.safetensors",
        help="weights to write (a .json with accuracy and fingerprint goes beside)",
    )
    t.add_argument("--epochs", type=int, default=8, metavar="E", help="epochs (default 8)")
    t.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    t.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_features(args) -> int:
    """``meanflow features train``: a feature network for FD on small images."""
    import time

    from ..data import open_data
    from ..eval.features import save_feature_net, train_feature_net

    check(
        args.overwrite or not os.path.exists(args.out),
        f"{args.out!r} already exists; pass --overwrite to replace it or choose another name",
    )
    data = open_data(args.data, directory=args.data_dir or "", size=args.image_size)
    check(
        data.kind == "images" and data.labels is not None,
        f"{args.data!r} is not labelled "
        "image data; a feature network is a classifier of the dataset's classes",
    )
    # open_data loads images into memory (x is set); the labels were checked above
    assert data.x is not None and data.labels is not None
    if args.data in ("fashion-mnist", "cifar10"):
        test = open_data(args.data, directory=args.data_dir or "", split="test")
        assert test.x is not None and test.labels is not None  # a labelled split, in memory
        train_x, train_y, test_x, test_y = data.x, data.labels, test.x, test.labels
    else:  # hold out a seeded 20% for the accuracy
        import torch

        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
        cut = len(data) - len(data) // 5
        train_x, train_y = data.x[perm[:cut]], data.labels[perm[:cut]]
        test_x, test_y = data.x[perm[cut:]], data.labels[perm[cut:]]
    start = time.perf_counter()
    model, acc = train_feature_net(
        train_x,
        train_y,
        test_x,
        test_y,
        data.num_classes,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.quiet,
    )
    meta = save_feature_net(
        model,
        args.out,
        {
            "data": args.data,
            "image_shape": list(data.shape),
            "classes": data.class_names,
            "test_accuracy": acc,
            "test_num": len(test_x),
            "epochs": args.epochs,
            "seed": args.seed,
            "train_seconds": round(time.perf_counter() - start, 1),
        },
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "test_accuracy": acc,
                "test_num": len(test_x),
                "fingerprint": meta["fingerprint"],
                "seconds": meta["train_seconds"],
            }
        )
    )
    return 0
