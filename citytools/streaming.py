"""classify.py's datasets route: a `datasets` dataset read as a stream (a Hub id, a local folder, or a
builder such as webdataset or parquet over --data-files), each sample keyed so that a killed run
resumes exactly, split across torchrun ranks by `datasets.distributed.split_dataset_by_node`, and
decoded in the loader's workers as the folder route decodes files (`SampleStream`).

A sample's key (the `key` column, what resume and the rank merge go by):
- `--id-column C`: the value of C;
- webdataset (`__key__`/`__url__` columns): the tar file's name in the split and `__key__`;
- otherwise: the data file's name in the split and the sample's row in that file (`shard`, `row`).
Reading goes through `datasets` per data file, in a generator-backed IterableDataset whose shards are
the data files: so split_dataset_by_node splits by file (when the files divide among the ranks) and
every sample still knows its file and row, whatever the number of ranks.
"""

import json
import os
import time
from itertools import islice

from citytools.discovery import path_key
from citytools.images import error_text, load_dataset_image
from citytools.loading import QueueFedStream, fault_injection, is_done
from citytools.toolkit import UsageError, first_line

RETRIES = 5  # tries of a shard read that fails on the network, with backoff doubling from RETRY_SECONDS
RETRY_SECONDS = 2.0


class DatasetSource:
    """What a dataset route run reads: the split's data files (its shards), the image column(s), the
    key columns, and the samples of one rank (`samples`). Picklable as what it was opened with (it goes
    with `SampleStream` to decoding workers that are spawned, not forked, and opens the dataset again
    there): `datasets` hashes it with `samples`' generator's arguments, and the opened stream's objects
    need not pickle (with transformers 5.17 one did not, and the route failed on a GPU machine)."""

    def __init__(self, name, split="train", data_files=None, image_column=None, id_column=None, config=None):
        import datasets

        self.name, self.split, self.data_files, self.config = name, split, list(data_files or []), config
        self.id_column = id_column
        self.opened_with = (name, split, self.data_files, image_column, id_column, config)
        try:
            files = {split: self.data_files} if data_files else None
            builder = datasets.load_dataset_builder(name, config, data_files=files)
            stream = builder.as_streaming_dataset(split=split)
            if type(builder).__name__ == "WebDataset":  # columns inferred from the first samples: see below
                features = webdataset_features(stream.features, id_column)
                builder = datasets.load_dataset_builder(name, config, data_files=files, features=features)
                stream = builder.as_streaming_dataset(split=split)
            files = builder.config.data_files.get(split) if builder.config.data_files else None
        except UsageError:
            raise
        except Exception as error:  # noqa: BLE001 - no such dataset, split, files; the Hub out of reach
            raise UsageError(f"{name}: cannot open the dataset ({first_line(error)})") from None
        splits = builder.info.splits or {}
        self.count = splits[split].num_examples if split in splits and splits[split].num_examples else None
        features = stream.features or {}
        self.image_columns = pick_image_columns(name, features, image_column)
        if id_column and id_column not in features:
            raise UsageError(f"{name}: no column {id_column!r} for --id-column (has {', '.join(features)})")
        self.webdataset = "__key__" in features and "__url__" in features and not id_column
        for column in self.image_columns:
            if isinstance(features[column], datasets.Image):
                stream = stream.cast_column(column, datasets.Image(decode=False))
        wanted = self.image_columns + [c for c in (id_column, "__key__", "__url__") if c and c in features]
        self.stream = stream.select_columns(list(dict.fromkeys(wanted)))
        self.shards = shard_names(list(files or []), stream.num_shards)
        self.urls = list(map(str, files)) if files and len(files) == stream.num_shards else list(self.shards)
        # an image folder is one shard of many files: a sample's file names it instead
        self.file_names = dict(zip(map(str, files), shard_names(list(map(str, files)), len(files)))) \
            if files and len(files) != stream.num_shards else {}
        self.id_type = features[id_column].pa_type if id_column and hasattr(features[id_column], "pa_type") else None

    def __reduce__(self):
        return DatasetSource, self.opened_with

    # ----------------------------------------------------------------------------------- the output

    def key_columns(self):
        """The output's columns before width/height/error/scores (name -> arrow type name, or a pyarrow
        type for an id column): `key`, then what the source dataset joins on."""
        if self.id_column:
            return {"key": "string", self.id_column: self.id_type or "string"}
        if self.webdataset:
            return {"key": "string", "__key__": "string", "__url__": "string"}
        return {"key": "string", "shard": "string", "row": "int64"}

    def description(self):
        """What is read, for the output's setup record and metadata (resuming another source is refused)."""
        return {"dataset": self.name, "config": self.config, "split": self.split, "data_files": self.data_files,
                "image_column": self.image_columns, "id_column": self.id_column}

    # ---------------------------------------------------------------------------------- the samples

    def samples(self, rank=0, world=1):
        """This rank's samples in reading order: dicts with the key columns, `image` (the column's value:
        {"bytes", "path"}, bytes, a path, or None) and `error` (None, or why the sample has no image: a
        shard that cannot be read gives one such row, keyed `<shard>#unreadable`)."""
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node

        shards = IterableDataset.from_generator(read_shards, gen_kwargs={"shards": list(enumerate(self.shards)),
                                                                          "source": [self] * len(self.shards)})
        if world > 1:
            shards = split_dataset_by_node(shards, rank=rank, world_size=world)
        yield from shards

    def read_shard(self, index, name):
        """One data file's samples (see `samples`), retrying network failures with backoff (reopened,
        the samples read before skipped): a shard that fails RETRIES times in a row at one place ends
        the run (StreamError; the rows so far are kept, a rerun resumes); one that cannot be read
        (corrupt) gives an error row and the run goes on."""
        position, tries, failed_at = 0, 0, -1
        while True:
            try:
                rows = self.stream.shard(num_shards=len(self.shards), index=index, contiguous=True)
                for row in islice(iter_with_fault_injection(rows, name), position, None):
                    yield self.sample(name, position, row)
                    position += 1
                return
            except Exception as error:  # noqa: BLE001 - sorted below: retried, an error row, or the end of the run
                if not is_network_error(error):
                    yield self.unreadable(index, name, position, error)
                    return
                tries = tries + 1 if position == failed_at else 1  # counted afresh once reading went on
                failed_at = position
                if tries >= RETRIES:
                    raise StreamError(f"{name}: cannot be read after {tries} tries ({first_line(error)}); the "
                                      "scores so far are kept: rerun the same command to resume") from None
                time.sleep(float(os.environ.get("CITYCLASSIFIER_RETRY_SECONDS", RETRY_SECONDS)) * 2 ** (tries - 1))

    def sample(self, shard, row, values):
        image = next((values[c] for c in self.image_columns if values.get(c) is not None), None)
        out = {"image": image, "error": None}
        if self.id_column:
            out["key"] = str(values[self.id_column])
            out[self.id_column] = values[self.id_column]
        elif self.webdataset:
            out.update(key=f"{shard}/{values['__key__']}", __key__=values["__key__"], __url__=values["__url__"])
        else:
            path = image.get("path") if isinstance(image, dict) else None
            if path in self.file_names:
                shard, row = self.file_names[path], 0
            out.update(key=f"{shard}#{row}", shard=shard, row=row)
        return out

    def unreadable(self, index, shard, position, error):
        """The error row of a shard that stops being readable at `position`."""
        row = {"key": f"{shard}#unreadable", "image": None,
               "error": f"this shard cannot be read after {position} sample(s): the rest of it is not scored "
                        f"({first_line(error)})"}
        if self.id_column:
            row[self.id_column] = None
        elif self.webdataset:
            row.update(__key__=None, __url__=self.urls[index])
        else:
            row.update(shard=shard, row=position)
        return row


class StreamError(UsageError):
    """A shard out of reach after every retry: one line, exit status 2, the output resumable."""


def read_shards(shards, source):
    """The generator behind `DatasetSource.samples`: `shards` ((index, name) pairs) and `source` are
    lists, which `datasets` splits into shards (all `source` items are the same object)."""
    for (index, name), owner in zip(shards, source):
        yield from owner.read_shard(index, name)


def iter_with_fault_injection(rows, shard):
    """Test hook: CITYCLASSIFIER_STREAM_FAIL=SHARD:N:COUNT makes reading SHARD raise ConnectionError
    after N samples, COUNT times in all in this process (a network that drops), tests/test_streaming.py."""
    spec = os.environ.get("CITYCLASSIFIER_STREAM_FAIL")
    if not spec or spec.rsplit(":", 2)[0] != shard:
        yield from rows
        return
    _, after, count = spec.rsplit(":", 2)
    for i, row in enumerate(rows):
        if i == int(after) and iter_with_fault_injection.failures < int(count):
            iter_with_fault_injection.failures += 1
            raise ConnectionError(f"injected network failure {iter_with_fault_injection.failures}")
        yield row


iter_with_fault_injection.failures = 0


def is_network_error(error):
    """Whether reading failed on the way (worth retrying) rather than on the data."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    names = " ".join(f"{c.__module__}.{c.__name__}" for c in type(error).__mro__)
    return any(word in names for word in ("aiohttp", "requests.exceptions", "httpx", "urllib3", "HfHubHTTPError"))


WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def webdataset_features(inferred, id_column=None):
    """The columns to read webdataset shards with: `datasets` infers them from the first tar's first
    five samples and drops any field it did not see there (a .webp first met in a later shard would be
    an image-less sample), so every common image extension is an Image column, beside those inferred;
    other fields are not read (but an --id-column)."""
    import datasets

    images = {c: datasets.Image() for c, f in inferred.items() if isinstance(f, datasets.Image)}
    images.update({ext: datasets.Image() for ext in WEBDATASET_IMAGES if ext not in images})
    named = {id_column: inferred[id_column]} if id_column in inferred and id_column not in images else {}
    return datasets.Features({**images, **named, "__key__": datasets.Value("string"),
                              "__url__": datasets.Value("string")})


def pick_image_columns(name, features, asked):
    """The columns a sample's image is read from: --image-column, else `image`, else every Image column
    (webdataset shards of mixed formats have one per extension: a sample's first non-empty one counts)."""
    import datasets

    if asked:
        if asked not in features:
            raise UsageError(f"{name}: no column {asked!r} (has {', '.join(features)})")
        return [asked]
    if "image" in features:
        return ["image"]
    found = [c for c, feature in features.items() if isinstance(feature, datasets.Image)]
    if not found:
        raise UsageError(f"{name}: no image column found: name it with --image-column (has {', '.join(features)})")
    return found


def shard_names(files, count):
    """Each shard's name: its data file's path below the folder all the split's files share (stable
    when the folder moves or the Hub revision changes), or shard-NNNNN where the reader's shards are
    not the data files."""
    if len(files) != count:
        return [f"shard-{i:05d}" for i in range(count)]
    parts = [str(f).split("/") for f in files]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


class SampleStream(QueueFedStream):
    """This rank's samples not yet in the output, decoded and cut in the loader's workers: the walk
    (reading the shards, a thread of the main process) hands each worker the next sample, its bytes
    included, as the folder route hands out paths."""

    QUEUE_PER_WORKER = 8

    def __init__(self, source, scorer, done, rank, world, max_pixels, markers=None):
        super().__init__(markers)
        self.source, self.scorer, self.done = source, scorer, done
        self.rank, self.world, self.max_pixels = rank, world, max_pixels
        self.repeats = 0  # samples whose key came again in this run (an --id-column with duplicates)

    def pending(self):
        seen = set()
        for sample in self.source.samples(self.rank, self.world):
            key = path_key(sample["key"])
            if is_done(self.done, key):
                continue
            if key in seen:
                self.repeats += 1
                continue
            seen.add(key)
            yield sample

    def takes(self, sample, info):
        return path_key(sample["key"]) % info.num_workers == info.id

    def marker_text(self, sample):
        return json.dumps(sample_meta(sample))

    def load(self, sample):
        meta = sample_meta(sample)
        if meta["error"] is not None:
            return meta, None
        try:
            fault_injection(sample["key"])
            image = load_dataset_image(sample["image"], self.max_pixels, self.scorer.work_pixels)
            meta["width"], meta["height"] = image.info["picture_size"]
            return meta, self.scorer.preprocess(image)
        except Exception as error:  # noqa: BLE001 - one bad sample must never stop the run
            meta["error"] = error_text(error)
        return meta, None


def sample_meta(sample):
    """A sample's row before its scores: the key columns, width, height, error."""
    meta = {k: v for k, v in sample.items() if k not in ("image", "error")}
    meta.update(width=None, height=None, error=sample["error"])
    return meta


def death_row(marker_text, reason):
    """The error row of the sample a decoding worker died on (`WorkerMarkers.culprits`)."""
    return dict(json.loads(marker_text), error=reason)
