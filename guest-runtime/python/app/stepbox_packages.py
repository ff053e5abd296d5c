"""The third-party packages bundled into the `python` runtime's snapshot.

build.sh installs the pinned pure-Python packages of `requirements.txt` into a build-time directory
that componentize-py puts on `sys.path` while it pre-initialises the interpreter; that directory
holds `BUNDLE_MARKER`. Nothing of it exists at run time: only what is in memory when the snapshot is
taken. So `load()`:

- imports every module of every bundled package (`SKIPPED` lists the ones that cannot import on
  WASI, with the reason), with a stand-in `mmap` for xlrd that reads the file instead;
- keeps every package data file (time zones, chardet's models, ...) in memory and gives the
  packages' modules loaders that serve them: `importlib.resources.files(...)`, `pkgutil.get_data`
  and so `zoneinfo`, `dateutil.tz`, `pytz` and chardet find their data at run time;
- keeps each distribution's metadata in memory, so `importlib.metadata.version("openpyxl")` and
  entry points (Markdown's extensions) work;
- warms what the packages load lazily, and checks that every IANA zone is in memory and that zones
  load through `zoneinfo`, `dateutil.tz.gettz` and `pytz` (the build fails otherwise: a zone lookup
  giving None is a bug).
"""

import importlib
import importlib.abc
import importlib.metadata
import importlib.resources
import importlib.resources._adapters  # noqa: F401 - used lazily by importlib.resources.files
import importlib.resources.abc
import io
import os
import pkgutil
import posixpath
import sys
import types
import warnings
import zlib

BUNDLE_MARKER = "stepbox-bundle.txt"

# Sub-packages and modules never imported: tests, and `__main__` modules (some act on import).
_SKIP_PARTS = {"test", "tests", "testing", "__main__"}
# Top-level names in the bundle directory that are not packages to import: PyYAML's shim for its
# compiled extension (dropped at build time).
_SKIP_TOP = {"_yaml", "bin"}
# Files never kept in memory: code (imported instead) and compiled parts (unusable on WASI).
_CODE_SUFFIXES = (".py", ".pyc", ".pyi", ".so", ".pyd", ".c", ".h", "py.typed")

# name -> version of every bundled distribution
DISTRIBUTIONS = {}
# module name -> "ExceptionType: message" for modules that could not be imported
SKIPPED = {}
# top-level import names of the bundle
TOP_LEVEL = []

_site = None  # the bundle directory at build time (its path is meaningless at run time)
_data = {}  # path relative to the bundle directory -> zlib-compressed bytes
_dirs = {}  # directory relative to the bundle directory ("" is the root) -> set of child names


def _find_site():
    for entry in sys.path:
        if entry and os.path.isfile(os.path.join(entry, BUNDLE_MARKER)):
            return entry
    return None


def _rel(path):
    """`path` relative to the bundle directory, or None when outside it."""
    if _site is None or not isinstance(path, str):
        return None
    path = posixpath.normpath(path)
    if path == _site:
        return ""
    if path.startswith(_site + "/"):
        return path[len(_site) + 1:]
    return None


# --- data files served from memory -----------------------------------------------------------------

class MemoryPath(importlib.resources.abc.Traversable):
    """A file or directory of the bundle as it was at build time, read from memory."""

    def __init__(self, rel):
        self._rel = rel

    def __repr__(self):
        return f"MemoryPath({self._rel!r})"

    def __eq__(self, other):
        return isinstance(other, MemoryPath) and other._rel == self._rel

    def __hash__(self):
        return hash(self._rel)

    def __str__(self):
        return posixpath.join(_site or "", self._rel)

    @property
    def name(self):
        return posixpath.basename(self._rel)

    @property
    def parent(self):
        return MemoryPath(posixpath.dirname(self._rel))

    def is_dir(self):
        return self._rel in _dirs

    def is_file(self):
        return self._rel in _data

    def exists(self):
        return self.is_dir() or self.is_file()

    def iterdir(self):
        if self._rel not in _dirs:
            raise NotADirectoryError(str(self))
        for child in sorted(_dirs[self._rel]):
            yield MemoryPath(posixpath.join(self._rel, child) if self._rel else child)

    def joinpath(self, *descendants):
        rel = self._rel
        for part in descendants:
            rel = posixpath.normpath(posixpath.join(rel, os.fspath(part)))
        if rel == ".":
            rel = ""
        return MemoryPath(rel)

    def __truediv__(self, child):
        return self.joinpath(child)

    def read_bytes(self):
        try:
            return zlib.decompress(_data[self._rel])
        except KeyError:
            if self._rel in _dirs:
                raise IsADirectoryError(str(self)) from None
            raise FileNotFoundError(2, "No such file or directory", str(self)) from None

    def read_text(self, encoding=None, errors=None):
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")

    def open(self, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise PermissionError(f"{self} is read-only")
        raw = io.BytesIO(self.read_bytes())
        if "b" in mode:
            return raw
        return io.TextIOWrapper(raw, *args, **kwargs)


class _MemoryReader(importlib.resources.abc.TraversableResources):
    def __init__(self, rel):
        self._rel = rel

    def files(self):
        return MemoryPath(self._rel)


class _MemoryLoader:
    """Wraps a bundled module's loader: data reads go to memory, everything else to the original."""

    def __init__(self, inner, package_rel):
        self._inner = inner
        self._package_rel = package_rel

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_resource_reader(self, fullname=None):
        return _MemoryReader(self._package_rel)

    def get_data(self, path):
        rel = _rel(path)
        if rel is not None and rel in _data:
            return zlib.decompress(_data[rel])
        raise FileNotFoundError(2, "No such file or directory", path)


def _keep_data_files(top_dirs):
    for top in top_dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(_site, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel_dir = _rel(dirpath)
            _dirs.setdefault(rel_dir, set()).update(dirnames)
            for f in filenames:
                if f.endswith(_CODE_SUFFIXES):
                    continue
                with open(os.path.join(dirpath, f), "rb") as fh:
                    _data[posixpath.join(rel_dir, f)] = zlib.compress(fh.read(), 9)
                _dirs[rel_dir].add(f)
    _dirs.setdefault("", set()).update(top_dirs)


def _serve_from_memory():
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        rel = _rel(origin)
        if rel is None or spec.loader is None or isinstance(spec.loader, _MemoryLoader):
            continue
        package_rel = posixpath.dirname(rel)
        loader = _MemoryLoader(spec.loader, package_rel)
        spec.loader = loader
        module.__loader__ = loader


# --- distribution metadata from memory -------------------------------------------------------------

class _MemoryDistribution(importlib.metadata.Distribution):
    def __init__(self, files):
        self._files = files

    def read_text(self, filename):
        return self._files.get(filename)

    def locate_file(self, path):
        return MemoryPath(str(path))


class _MemoryDistributionFinder(importlib.abc.MetaPathFinder):
    """Finds the bundled distributions for `importlib.metadata` at run time."""

    def __init__(self, dists):
        self._dists = dists  # normalised name -> _MemoryDistribution

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        # Only for searches of sys.path (the default): a caller naming other paths means them.
        if "path" in vars(context) and context.path is not sys.path:
            return iter(())
        if context.name is None:
            return iter(list(self._dists.values()))
        key = importlib.metadata.Prepared.normalize(context.name)
        dist = self._dists.get(key)
        return iter([dist] if dist is not None else [])


def _keep_metadata():
    found = {}
    for dist in importlib.metadata.distributions(path=[_site]):
        name = dist.metadata["Name"]
        files = {}
        for filename in ("METADATA", "entry_points.txt", "top_level.txt", "WHEEL"):
            text = dist.read_text(filename)
            if text is None:
                continue
            if filename == "METADATA":
                text = text.split("\n\n", 1)[0] + "\n"  # headers only: not the long description
            files[filename] = text
        found[importlib.metadata.Prepared.normalize(name)] = _MemoryDistribution(files)
        DISTRIBUTIONS[name] = dist.version
    sys.meta_path.append(_MemoryDistributionFinder(found))


# --- imports ---------------------------------------------------------------------------------------

class _MmapStandIn(types.ModuleType):
    """What xlrd needs of `mmap` (WASI has none): `mmap.mmap(fd, size, access=ACCESS_READ)`, read."""

    ACCESS_DEFAULT, ACCESS_READ, ACCESS_WRITE, ACCESS_COPY = 0, 1, 2, 3

    @staticmethod
    def mmap(fileno, length, *args, **kwargs):
        chunks, offset = [], 0
        os.lseek(fileno, 0, os.SEEK_SET)
        while length <= 0 or offset < length:
            chunk = os.read(fileno, (length - offset) if length > 0 else 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)


def _import(name):
    try:
        return importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - anything that fails to import is listed
        SKIPPED[name] = f"{type(exc).__name__}: {exc}"
        return None


def _biggest_modules_first():
    """Imports the modules with the largest sources first. Compiling a 0.6 MB dict literal
    (pypdf's glyph table) takes ~40 MB for a moment; freed memory stays in the snapshot's memory
    image, so such peaks are cheapest while the heap is still small."""
    sizes = []
    for dirpath, dirnames, filenames in os.walk(_site):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_PARTS and d != "__pycache__"
                       and not d.endswith((".dist-info", ".data"))]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                size = os.path.getsize(path)
                if size >= 64 * 1024:
                    rel = _rel(path)[:-3].split("/")
                    if rel[-1] == "__init__":
                        rel.pop()
                    if rel[0] not in _SKIP_TOP and not _SKIP_PARTS.intersection(rel):
                        sizes.append((size, ".".join(rel)))
    for _, name in sorted(sizes, reverse=True):
        _import(name)


def _import_all():
    _biggest_modules_first()
    tops = []
    for info in pkgutil.iter_modules([_site]):
        if info.name in _SKIP_TOP or info.name.startswith("__"):
            continue
        tops.append(info)
    for info in sorted(tops, key=lambda i: i.name):
        module = _import(info.name)
        if module is None:
            continue
        TOP_LEVEL.append(info.name)
        if not info.ispkg:
            continue
        for sub in pkgutil.walk_packages(module.__path__, info.name + ".",
                                         onerror=lambda name: SKIPPED.setdefault(name, "error")):
            if _SKIP_PARTS.intersection(sub.name.split(".")):
                continue
            _import(sub.name)
    # walk_packages records a package whose import failed through onerror; keep the reasons.
    for name in [n for n, why in SKIPPED.items() if why == "error"]:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001
            SKIPPED[name] = f"{type(exc).__name__}: {exc}"


# --- warming ---------------------------------------------------------------------------------------

def _zone_keys():
    return [k for k in importlib.resources.files("tzdata").joinpath("zones").read_text().split() if k]


def _warm_openpyxl():
    import datetime
    import openpyxl
    from openpyxl.chart import BarChart, Reference
    from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(("name", "n", "x", "when", "ok"))
    ws.append(("a", 1, 1.5, datetime.datetime(2024, 1, 2, 3, 4), True))
    ws["F2"] = "=B2*C2"
    ws["A1"].font = Font(bold=True)
    ws["A1"].fill = PatternFill("solid", fgColor="DDDDDD")
    ws["A1"].alignment = Alignment(horizontal="center")
    ws["A1"].border = Border(bottom=Side(style="thin"))
    ws.column_dimensions["A"].width = 20
    ws.merge_cells("G1:H1")
    chart = BarChart()
    chart.add_data(Reference(ws, min_col=2, min_row=1, max_row=2), titles_from_data=True)
    ws.add_chart(chart, "J2")
    # Saving needs a writable temporary directory, which pre-initialisation has not: read a
    # workbook made by xlsxwriter in memory instead.
    if "xlsxwriter" in sys.modules:
        data = _warm_xlsxwriter()
        list(openpyxl.load_workbook(io.BytesIO(data)).active.iter_rows(values_only=True))
        openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True).close()


def _warm_xlsxwriter():
    import datetime
    import xlsxwriter
    buf = io.BytesIO()
    wb = xlsxwriter.Workbook(buf, {"in_memory": True})
    ws = wb.add_worksheet("S")
    bold = wb.add_format({"bold": True, "num_format": "yyyy-mm-dd", "bg_color": "#DDDDDD"})
    ws.write_row(0, 0, ["a", 1, 1.5, True, None])
    ws.write_datetime(1, 0, datetime.datetime(2024, 1, 2), bold)
    ws.write_string(1, 1, "ünicode ✓")
    ws.write_formula(2, 0, "=SUM(B1:C1)")
    ws.write_url(3, 0, "https://example.com")
    ws.set_column(0, 1, 20)
    ws.add_table(5, 0, 6, 1, {"columns": [{"header": "k"}, {"header": "v"}]})
    ws.conditional_format(0, 1, 4, 1, {"type": "cell", "criteria": ">", "value": 1, "format": bold})
    chart = wb.add_chart({"type": "line"})
    chart.add_series({"values": "=S!$B$1:$B$3"})
    ws.insert_chart("E2", chart)
    wb.close()
    return buf.getvalue()


def _warm_dates():
    import datetime
    from dateutil import parser, rrule, tz
    from dateutil.relativedelta import relativedelta
    for text in ("2024-01-15 12:00", "July 4, 2024 9:30 PM", "2024-03-10T01:59:59Z",
                 "Tue, 05 Mar 2024 10:00:00 +0100", "03/04/2024", "3rd of March 2023", "12h30"):
        parser.parse(text, fuzzy=True)
    parser.parse("31/12/2024", dayfirst=True)
    parser.isoparse("2024-03-10T01:59:59.123+05:30")
    ny = tz.gettz("America/New_York")
    datetime.datetime(2024, 3, 10, 12, tzinfo=ny).astimezone(tz.UTC).astimezone(tz.tzlocal())
    datetime.date(2024, 1, 31) + relativedelta(months=+1, weekday=rrule.MO(+1))
    list(rrule.rrule(rrule.MONTHLY, count=3, bymonthday=-1, dtstart=datetime.datetime(2024, 1, 1)))
    tz.gettz.cache_clear()


def _warm_text():
    import charset_normalizer
    import jinja2
    import markdown
    import tabulate
    import yaml
    env = jinja2.Environment(loader=jinja2.DictLoader({
        "b": "<ul>{% block body %}{% endblock %}</ul>",
        "p": "{% extends 'b' %}{% block body %}{% for r in rows %}<li>{{ r.n|title }} {{ '%.2f'|format(r.x) }}"
             "{{ r.n|e }}{% if loop.last %}.{% endif %}</li>{% endfor %}{% endblock %}"}), autoescape=True)
    env.get_template("p").render(rows=[{"n": "a <b>", "x": 1}])
    jinja2.Template("{{ n }}{{ 's' if n != 1 }}{% for i in range(2) %}{{ i }}{% endfor %}").render(n=2)
    rows = [["a", 1, 1.5], ["b", 22, 0.25]]
    for fmt in ("simple", "github", "grid", "pipe", "plain", "html", "psql", "rst", "fancy_grid"):
        tabulate.tabulate(rows, headers=["k", "n", "x"], tablefmt=fmt, floatfmt=".2f")
    yaml.safe_load(yaml.safe_dump({"a": [1, 2.5, None, True, "x"], "d": {"k": "v"}}, allow_unicode=True))
    yaml.load("a: 2024-01-02\nb: !!str 1\n", Loader=yaml.FullLoader)
    markdown.markdown("# t\n\n*e* `c` [l](http://x)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\ncode\n```\n",
                      extensions=["extra", "tables", "fenced_code", "toc", "sane_lists", "nl2br"])
    fr = "Le café de la gare ouvre à sept heures, après le crème.\n" * 3
    ru = "Привет! Это проверка определения кодировки, Москва.\n" * 3
    for raw in (fr.encode("cp1252"), ru.encode("cp1251"), fr.encode("utf-8"), fr.encode("utf-16")):
        str(charset_normalizer.from_bytes(raw).best())


def _warm_html_xml():
    import defusedxml.ElementTree
    from bs4 import BeautifulSoup
    soup = BeautifulSoup("<html><body><div class='a b' id='m'><table><tr class='r'><td>1</td>"
                         "<td><a href='http://x/y.csv' title='t'>l</a></td></tr></table><ul><li>x</li>"
                         "<li>y</li></ul><p>t &amp; u</p><h2>h</h2></div></body></html>", "html.parser")
    # soupsieve compiles its selector grammar's patterns on first use.
    for sel in ("div#m > table tr.r td:nth-of-type(2)", "a[href^='http'][title]", "a[href$='.csv' i]",
                "li:first-child, li:last-child", "ul li:nth-child(2n+1)", "div.a.b p", "td:not(.x)",
                ":is(h1, h2)", "p:-soup-contains('t')", "tr:has(> td)", "li ~ li", "h2 + p", "*:root",
                "[class~=b]", "td:empty", "a:link"):
        soup.select(sel)
    soup.find_all("td"), soup.get_text(" ", strip=True)
    defusedxml.ElementTree.fromstring("<a><b k='v'>t</b></a>").iter("b")


def _warm_tables():
    import petl
    import tablib
    t = petl.fromcsv(petl.MemorySource(b"k,n,x\na,1,1.5\nb,2,2.5\na,3,1\n"))
    t = petl.addfield(petl.convert(t, {"n": int, "x": float}), "y", lambda r: r["n"] * r["x"])
    petl.look(t), petl.nrows(petl.select(t, lambda r: r["n"] > 1))
    petl.tocsv(petl.sort(petl.aggregate(t, "k", aggregation={"n": ("n", sum)}), "k"), petl.MemorySource())
    data = tablib.Dataset(("a", 1), ("b", 2), headers=("k", "v"))
    for fmt in ("csv", "json", "yaml", "html", "tsv", "rst", "cli", "latex", "jira", "xlsx"):
        try:
            data.export(fmt)
        except BaseException:  # noqa: BLE001 - a format needing a package that is not bundled
            pass
    tablib.Dataset().load("k,v\na,1\n", format="csv")


def _warm_pdf():
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
    writer = PdfWriter()
    page = writer.add_blank_page(width=200, height=200)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    content = DecodedStreamObject()
    content.set_data(b"BT /F1 12 Tf 10 100 Td (x) Tj ET")
    page[NameObject("/Contents")] = writer._add_object(content)
    writer.add_metadata({"/Title": "t"})
    buf = io.BytesIO()
    writer.write(buf)
    reader = PdfReader(io.BytesIO(buf.getvalue()))
    reader.metadata.title, reader.pages[0].extract_text()


# What each package compiles or caches on first use (regular expressions, lexers, lookup tables):
# done once here so a step does not pay for it (20-240 ms each measured in the sandbox). Not
# chardet: its first `detect` expands models.bin (0.6 MB, kept in memory) into 26 MB of tables,
# which every run would then carry; a step that uses chardet pays ~0.1 s once instead.
_WARMERS = {
    "openpyxl": _warm_openpyxl, "xlsxwriter": _warm_xlsxwriter, "dateutil": _warm_dates,
    "jinja2": _warm_text, "bs4": _warm_html_xml, "petl": _warm_tables, "pypdf": _warm_pdf,
}
# warmer name -> "ExceptionType: message" for a warm-up that failed (the tests expect none)
WARM_FAILED = {}


def _warm():
    import codecs
    import datetime

    for enc in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1",
                "cp1252", "ascii", "cp437", "cp850", "mac-roman", "iso-8859-15", "shift_jis",
                "euc-jp", "gb2312", "gbk", "gb18030", "big5", "euc-kr", "cp1251", "koi8-r"):
        codecs.lookup(enc)
    datetime.datetime.strptime("2024-01-02 03:04:05", "%Y-%m-%d %H:%M:%S")
    for package, warmer in _WARMERS.items():
        if package not in sys.modules:
            continue
        try:
            warmer()
        except BaseException as exc:  # noqa: BLE001 - reported, the tests check it is empty
            WARM_FAILED[warmer.__name__] = f"{type(exc).__name__}: {exc}"
    if "pytz" in sys.modules:
        import pytz
        len(pytz.all_timezones), len(pytz.common_timezones)  # lazy lists: fill them now


# A sample parsed through each library (the data path is the same for every zone): parsing all of
# them here would leave megabytes of freed heap in the snapshot. The tests parse every zone.
_SAMPLE_ZONES = ("UTC", "America/New_York", "Europe/Paris", "Asia/Kolkata", "Australia/Lord_Howe",
                 "America/Argentina/Buenos_Aires", "Pacific/Chatham")


def _check_zones():
    """Every IANA zone must be in memory, and load through zoneinfo, dateutil and pytz."""
    import zoneinfo

    # No system zone directories exist at run time: the tzdata package is the one source.
    zoneinfo.reset_tzpath(to=())
    keys = _zone_keys()
    broken = [k for k in keys if f"tzdata/zoneinfo/{k}" not in _data]
    pytz = sys.modules.get("pytz")
    if pytz is not None:
        broken += [f"pytz {k}" for k in pytz.all_timezones if f"pytz/zoneinfo/{k}" not in _data]
    gettz = None
    if "dateutil.tz" in sys.modules:
        from dateutil.tz import gettz
    for key in _SAMPLE_ZONES:
        try:
            zoneinfo.ZoneInfo.no_cache(key)
        except Exception as exc:  # noqa: BLE001
            broken.append(f"zoneinfo {key}: {exc!r}")
        if gettz is not None and gettz.nocache(key) is None:
            broken.append(f"dateutil {key}: None")
        if pytz is not None:
            try:
                pytz.timezone(key)
            except Exception as exc:  # noqa: BLE001
                broken.append(f"pytz {key}: {exc!r}")
    if pytz is not None:
        pytz._tzinfo_cache.clear()
        # pytz memoises every transition's datetime and offset: drop what the check created.
        pytz.tzinfo._timedelta_cache.clear()
        pytz.tzinfo._ttinfo_cache.clear()
        pytz.tzinfo._datetime_cache.clear()
        pytz.tzinfo._datetime_cache[0] = pytz.tzinfo._epoch
    if broken or len(keys) < 400:
        raise RuntimeError(f"time zones broken ({len(keys)} keys): {broken[:20]}")
    return len(keys)


def load():
    """Imports and prepares the bundle; does nothing when the build gave none."""
    global _site
    _site = _find_site()
    if _site is None:
        return
    _site = posixpath.normpath(_site)
    had_mmap = "mmap" in sys.modules
    if not had_mmap:
        sys.modules["mmap"] = _MmapStandIn("mmap")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _keep_metadata()
            tops = [n for n in sorted(os.listdir(_site))
                    if os.path.isdir(os.path.join(_site, n)) and n not in _SKIP_TOP
                    and not n.endswith((".dist-info", ".data")) and n != "__pycache__"]
            _keep_data_files(tops)
            _import_all()
            _serve_from_memory()
            _warm()
            _check_zones()
    finally:
        if not had_mmap:
            # Only xlrd holds the stand-in: `import mmap` in a step still fails as on WASI.
            del sys.modules["mmap"]
