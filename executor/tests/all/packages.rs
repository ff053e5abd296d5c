//! The third-party packages bundled into the `python` runtime (guest-runtime/python/requirements.txt)
//! do real work inside the sandbox: only what was imported and kept in memory when the snapshot was
//! taken exists at run time, so a package that loads a module, a codec or a data file lazily breaks
//! here and nowhere else. Each test checks results, never just that an import succeeded.

use stepbox::Status;

use crate::common::*;

/// Runs a Python step that must succeed and returns its stdout.
async fn ok(job: stepbox::StepJob) -> String {
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    out(&r)
}

/// The output file `name` of a run.
fn output<'a>(r: &'a stepbox::RunResult, name: &str) -> &'a [u8] {
    &r.outputs
        .iter()
        .find(|o| o.path == name)
        .unwrap_or_else(|| {
            panic!(
                "no output {name}: {:?}",
                r.outputs.iter().map(|o| &o.path).collect::<Vec<_>>()
            )
        })
        .content
}

#[tokio::test]
async fn every_bundled_package_imports_with_its_pinned_version() {
    let src = r#"
import importlib, importlib.metadata as md
mods = ["openpyxl", "et_xmlfile", "xlsxwriter", "xlrd", "dateutil", "dateutil.parser", "dateutil.tz",
        "dateutil.relativedelta", "dateutil.rrule", "tzdata", "pytz", "yaml", "tabulate", "jinja2",
        "markupsafe", "charset_normalizer", "chardet", "petl", "tablib", "pypdf", "defusedxml",
        "defusedxml.ElementTree", "markdown", "bs4", "soupsieve", "typing_extensions", "six",
        "zoneinfo"]
for m in mods:
    importlib.import_module(m)
dists = ["openpyxl", "et-xmlfile", "XlsxWriter", "xlrd", "python-dateutil", "tzdata", "pytz", "PyYAML",
         "tabulate", "Jinja2", "MarkupSafe", "charset-normalizer", "chardet", "petl", "tablib", "pypdf",
         "defusedxml", "Markdown", "beautifulsoup4", "soupsieve", "typing_extensions", "six"]
for d in dists:
    print(d, md.version(d))
import yaml, markupsafe
# The pure-Python code runs: the compiled parts were left out.
print(yaml.__with_libyaml__, hasattr(markupsafe, "_speedups"), "markupsafe._speedups" in importlib.sys.modules)
# What the build could not import on WASI (optional back ends whose packages are not bundled).
import stepbox_packages
print(" ".join(sorted(stepbox_packages.SKIPPED)))
# Every build-time warm-up (first use of each package) ran without an error.
print(stepbox_packages.WARM_FAILED)
"#;
    let o = ok(py(src)).await;
    let want = [
        "openpyxl 3.1.5",
        "et-xmlfile 2.0.0",
        "XlsxWriter 3.3.1",
        "xlrd 2.0.2",
        "python-dateutil 4.0.0",
        "tzdata 2026.6",
        "pytz 2026.6",
        "PyYAML 6.0.4",
        "tabulate 0.10.0",
        "Jinja2 3.1.6",
        "MarkupSafe 3.0.4",
        "charset-normalizer 3.5.3",
        "chardet 7.7.0",
        "petl 1.7.30",
        "tablib 3.10.0",
        "pypdf 7.1.1",
        "defusedxml 0.7.1",
        "Markdown 3.11.3",
        "beautifulsoup4 4.15.0",
        "soupsieve 4.1.3",
        "typing_extensions 4.16.0",
        "six 1.17.0",
        "False False False",
        "bs4.builder._html5lib bs4.builder._lxml dateutil.tz.win dateutil.tzwin defusedxml.lxml \
         openpyxl.utils.dataframe petl.io.csv_py2 pypdf._crypt_providers._cryptography \
         pypdf._crypt_providers._pycryptodome pypdf.generic._image_xobject tablib.formats._ods \
         tablib.formats._xls yaml.cyaml",
        "{}",
    ];
    assert_eq!(o, want.join("\n") + "\n");
}

#[tokio::test]
async fn openpyxl_writes_an_xlsx_and_reads_it_back() {
    let src = r#"
import datetime, openpyxl
from openpyxl.styles import Font
from openpyxl.chart import BarChart, Reference
rows = [("region", "units", "price", "day", "ok"),
        ("North", 12, 2.5, datetime.datetime(2024, 3, 1, 9, 30), True),
        ("Süd", 7, 4.25, datetime.datetime(2024, 3, 15), False)]
wb = openpyxl.Workbook()
ws = wb.active
ws.title = "Orders"
for row in rows:
    ws.append(row)
ws["F1"] = "total"
ws["F2"] = "=B2*C2"
ws["A1"].font = Font(bold=True)
chart = BarChart()
chart.add_data(Reference(ws, min_col=2, min_row=1, max_row=3), titles_from_data=True)
ws.add_chart(chart, "H2")
wb.create_sheet("Empty")
wb.save("orders.xlsx")

back = openpyxl.load_workbook("orders.xlsx")
print(back.sheetnames)
got = [tuple(r) for r in back["Orders"].iter_rows(max_col=5, values_only=True)]
assert got == rows, got
print(back["Orders"]["F2"].value, back["Orders"]["A1"].font.b, len(back["Orders"]._charts))
"#;
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "['Orders', 'Empty']\n=B2*C2 True 1\n");
    assert!(output(&r, "orders.xlsx").starts_with(b"PK\x03\x04"));
}

#[tokio::test]
async fn xlsxwriter_writes_a_file_that_openpyxl_reads() {
    let src = r#"
import datetime, xlsxwriter, openpyxl
wb = xlsxwriter.Workbook("/output/report.xlsx")
ws = wb.add_worksheet("Report")
bold = wb.add_format({"bold": True})
dates = wb.add_format({"num_format": "yyyy-mm-dd"})
ws.write_row(0, 0, ["item", "qty", "when", "note"], bold)
ws.write_row(1, 0, ["apples", 3])
ws.write_datetime(1, 2, datetime.datetime(2024, 5, 6), dates)
ws.write_string(1, 3, "ünïcödé ✓")
ws.write_row(2, 0, ["pears", 4])
ws.write_formula(3, 1, "=SUM(B2:B3)", None, 7)
chart = wb.add_chart({"type": "line"})
chart.add_series({"values": "=Report!$B$2:$B$3"})
ws.insert_chart("F2", chart)
wb.close()
back = openpyxl.load_workbook("/output/report.xlsx")["Report"]
print([[c for c in r] for r in back.iter_rows(values_only=True)])
"#;
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(
        out(&r),
        "[['item', 'qty', 'when', 'note'], ['apples', 3, datetime.datetime(2024, 5, 6, 0, 0), 'ünïcödé ✓'], \
         ['pears', 4, None, None], [None, '=SUM(B2:B3)', None, None]]\n"
    );
    assert!(output(&r, "report.xlsx").starts_with(b"PK\x03\x04"));
}

/// A two-sheet .xls written natively by xlwt 1.3.0 (zlib, then base64): region/units/price/shipped
/// rows with dates, and a second sheet.
const XLS_FIXTURE: &str = concat!(
    "eNrtWE1oE0EU/mY3fy1NmtRWbIUSClat7UG9eGmjUu3F1KoHfxC0bVYTKtmw2R70YrXGmyB4UrxUKuKl6sUfVFDwYE",
    "Go6EEoCKmepCdBwUOb9c3bTWxrhAa0UNkvzJuZN/PNzM6893ayb6ci+bEHTTNYgi6oKFhV8C3QCUpVxUoY1G5ZsljM",
    "A5QsF6sKVQE6SJ8XT4Nv/PIM5XnPQMF9z0uSwCdKx5FBr57WoiuI3byGfiHX0Ck8ZHsKblIKoZHXVcdykOUalve47z",
    "OWO1lzhWUn9c2LY5iK9bbtcOz4iNLCbSGSAo+YM82arWjAa2nH568Ku68Xu4xU/5lV1tDsqcE46Eh7tLRmyHotbqMa",
    "OEroiMc7urvzqKfjHsd3Kwp8K/r1i6irX1m9AOl/LNb7/6AP0CEu1V9TPMAIrJNCGnOOjHqfx3bl/UZCM7I5BHGZ47",
    "iX3NjUsnPo41gdsP3d0E6n9LQXGE6nzCzlGSM1qJHpZJOpTEZLkKZXN8wk5Yf0YTOpApPmlxpq1wb1dCKaTWqaWS3f",
    "DRxLwotiSZA9rIZkArVcjrCfhWn2ubtf38UH+mInWDPC67HfMhvkI8HCBckgcohbPCXZxowtLC/yqOu53MSynh6U8t",
    "a+Bqewd5T7XOLWVppnO+N9bOOC8iYq52YPPG7OfY5tpvJEz8y5+okPsTG00FsvQXz5G0W7aBc3rks8iRVz4cSjjywb",
    "f4tNASXsrN1yXqW1mJfeSIiwtGtyd0Sppjh7ZddUqqnOWKLMWILHkrvzHOt4rRFsY92sKuPlrVcK8SVbKcNWuKfXYd",
    "vn1My6Oz7Jni6x1TJslXv6HLbK7BDr2jhWn5qU7C6lDg/lRBSff2ElLEeU5Gq1HFHWcuRm8a6i3K66cOHChQsXLlyU",
    "g+B7JpxbHfgGKG9ffue7zjylgvuZ5L/FQej0M+kv5R6kKTdwtiL7WQuvKI4llskpfi+UOEyzGxjCAK9jqGL7pduzWP",
    "g8yyaG/54LVTp/oZJ1/uP5fwJ6VhsV",
);

#[tokio::test]
async fn xlrd_reads_an_xls_file() {
    let src = format!(
        r#"
import base64, zlib, xlrd
open("/tmp/orders.xls", "wb").write(zlib.decompress(base64.b64decode("{XLS_FIXTURE}")))
book = xlrd.open_workbook("/tmp/orders.xls")  # from a path: xlrd maps the file (mmap stand-in)
print(book.nsheets, book.sheet_names())
sheet = book.sheet_by_name("Orders")
for r in range(sheet.nrows):
    row = sheet.row_values(r)
    if r:
        row[3] = xlrd.xldate_as_datetime(row[3], book.datemode).date().isoformat()
    print(row)
same = xlrd.open_workbook(file_contents=open("/tmp/orders.xls", "rb").read())
print(same.sheet_by_index(1).cell_value(0, 0))
"#
    );
    let o = ok(py(&src)).await;
    assert_eq!(
        o,
        "2 ['Orders', 'Notes']\n\
         ['region', 'units', 'price', 'shipped']\n\
         ['North', 12.0, 2.5, '2024-03-01']\n\
         ['South', 7.0, 4.25, '2024-03-15']\n\
         ['Été', 3.0, 10.0, '2024-12-31']\n\
         second sheet\n"
    );
    // `mmap` itself stays unavailable to steps, as on WASI.
    let r = run(py("import mmap")).await;
    assert_status(&r, Status::Failed);
}

#[tokio::test]
async fn dateutil_parses_and_converts_between_named_zones() {
    let src = r#"
import datetime
from dateutil import parser, tz, rrule
from dateutil.relativedelta import relativedelta
ny, paris, kolkata = tz.gettz("America/New_York"), tz.gettz("Europe/Paris"), tz.gettz("Asia/Kolkata")
assert None not in (ny, paris, kolkata)
for text in ["2024-01-15 12:00", "July 4, 2024 9:30 PM", "2024-03-10T01:59:59", "2024-03-10T03:00:00"]:
    d = parser.parse(text).replace(tzinfo=ny)
    print(text, "|", d.utcoffset(), d.tzname(), "|", d.astimezone(paris).isoformat())
print(parser.parse("2024-06-01T08:00:00+02:00").astimezone(kolkata).isoformat())
print(parser.parse("3rd of March 2023", fuzzy=True).date(), parser.parse("31/12/2024", dayfirst=True).date())
print(datetime.date(2024, 1, 31) + relativedelta(months=+1), datetime.date(2024, 2, 29) + relativedelta(years=+1))
print([d.date().isoformat() for d in rrule.rrule(rrule.MONTHLY, count=3, bymonthday=-1, dtstart=datetime.datetime(2024, 1, 1))])
print(tz.gettz("UTC").utcoffset(datetime.datetime(2024, 1, 1)), tz.gettz("Nowhere/Nope"))
"#;
    assert_eq!(
        ok(py(src)).await,
        "2024-01-15 12:00 | -1 day, 19:00:00 EST | 2024-01-15T18:00:00+01:00\n\
         July 4, 2024 9:30 PM | -1 day, 20:00:00 EDT | 2024-07-05T03:30:00+02:00\n\
         2024-03-10T01:59:59 | -1 day, 19:00:00 EST | 2024-03-10T07:59:59+01:00\n\
         2024-03-10T03:00:00 | -1 day, 20:00:00 EDT | 2024-03-10T08:00:00+01:00\n\
         2024-06-01T11:30:00+05:30\n\
         2023-03-03 2024-12-31\n\
         2024-02-29 2025-02-28\n\
         ['2024-01-31', '2024-02-29', '2024-03-31']\n\
         0:00:00 None\n"
    );
}

#[tokio::test]
async fn zoneinfo_dateutil_and_pytz_know_every_iana_zone() {
    let src = r#"
import datetime, zoneinfo, pytz
from dateutil import tz
keys = sorted(zoneinfo.available_timezones())
assert len(keys) > 590, len(keys)
broken = [k for k in keys if tz.gettz(k) is None]
for k in keys:
    zoneinfo.ZoneInfo(k)
for k in pytz.all_timezones:
    pytz.timezone(k)
syd = zoneinfo.ZoneInfo("Australia/Sydney")
print(datetime.datetime(2024, 1, 1, tzinfo=syd).utcoffset(), datetime.datetime(2024, 7, 1, tzinfo=syd).utcoffset())
print(datetime.datetime(2024, 6, 1, 12, tzinfo=datetime.UTC).astimezone(zoneinfo.ZoneInfo("Asia/Kathmandu")).isoformat())
eastern = pytz.timezone("US/Eastern")
d = eastern.localize(datetime.datetime(2024, 3, 10, 1, 30))
print(d.isoformat(), eastern.normalize(d + datetime.timedelta(hours=1)).isoformat())
try:
    zoneinfo.ZoneInfo("Mars/Olympus_Mons")
except zoneinfo.ZoneInfoNotFoundError:
    print("unknown zone refused")
print(len(keys) > 590, broken, len(pytz.all_timezones) > 590)
"#;
    assert_eq!(
        ok(py(src)).await,
        "11:00:00 10:00:00\n\
         2024-06-01T17:45:00+05:45\n\
         2024-03-10T01:30:00-05:00 2024-03-10T03:30:00-04:00\n\
         unknown zone refused\n\
         True [] True\n"
    );
}

#[tokio::test]
async fn yaml_round_trips_in_pure_python() {
    let src = r#"
import datetime, yaml
doc = {"name": "export", "steps": [{"id": 1, "tags": ["a", "b"]}, {"id": 2, "ratio": 0.25, "on": True}],
       "when": datetime.date(2024, 2, 29), "note": "ünicode: ✓\nsecond line", "empty": None}
text = yaml.safe_dump(doc, sort_keys=True, allow_unicode=True)
assert yaml.safe_load(text) == doc
print(text, end="")
print(list(yaml.safe_load_all("a: 1\n---\nb: [x, y]\n")))
"#;
    assert_eq!(
        ok(py(src)).await,
        "empty: null\nname: export\nnote: 'ünicode: ✓\n\n  second line'\nsteps:\n- id: 1\n  tags:\n  - a\n  - b\n\
         - id: 2\n  'on': true\n  ratio: 0.25\nwhen: 2024-02-29\n[{'a': 1}, {'b': ['x', 'y']}]\n"
    );
}

#[tokio::test]
async fn jinja2_renders_templates_with_autoescape() {
    let src = r#"
import jinja2, markupsafe
env = jinja2.Environment(loader=jinja2.DictLoader({
    "base.html": "<ul>{% block body %}{% endblock %}</ul>",
    "page.html": "{% extends 'base.html' %}{% block body %}{% for r in rows %}<li>{{ r.name|title }}: {{ '%.2f'|format(r.total) }}{{ r.note }}</li>{% endfor %}{% endblock %}",
}), autoescape=True)
rows = [{"name": "ada lovelace", "total": 3.14159, "note": "<b>x</b>"}, {"name": "alan", "total": 2, "note": ""}]
print(env.get_template("page.html").render(rows=rows))
print(jinja2.Template("{{ n }} item{{ 's' if n != 1 }}").render(n=3), markupsafe.escape("<&>"))
"#;
    assert_eq!(
        ok(py(src)).await,
        "<ul><li>Ada Lovelace: 3.14&lt;b&gt;x&lt;/b&gt;</li><li>Alan: 2.00</li></ul>\n3 items &lt;&amp;&gt;\n"
    );
}

#[tokio::test]
async fn tabulate_formats_tables() {
    let src = r#"
from tabulate import tabulate
rows = [["apples", 3, 1.5], ["pears", 12, 0.25]]
print(tabulate(rows, headers=["fruit", "qty", "price"], tablefmt="github"))
print(tabulate(rows, tablefmt="grid", floatfmt=".2f"))
"#;
    assert_eq!(
        ok(py(src)).await,
        "| fruit   |   qty |   price |\n\
         |---------|-------|---------|\n\
         | apples  |     3 |    1.5  |\n\
         | pears   |    12 |    0.25 |\n\
         +--------+----+------+\n\
         | apples |  3 | 1.50 |\n\
         +--------+----+------+\n\
         | pears  | 12 | 0.25 |\n\
         +--------+----+------+\n"
    );
}

/// French text in cp1252 and Russian in cp1251, as files a step is given.
fn legacy_encoded_inputs() -> Vec<stepbox::InputFile> {
    let fr = "Le café de la gare ouvre à sept heures. Les clients réguliers commandent un crème et un croissant.\n".repeat(3);
    let ru = "Привет! Это проверка определения кодировки. Москва - столица России, а Санкт-Петербург - северная столица. Мы пишем длинный текст, чтобы статистика была надёжной.\n".repeat(3);
    let cp1252: Vec<u8> = fr
        .chars()
        .map(|c| match c {
            'é' => 0xE9,
            'à' => 0xE0,
            'è' => 0xE8,
            c if c.is_ascii() => c as u8,
            c => panic!("add {c} to the cp1252 table"),
        })
        .collect();
    let cp1251: Vec<u8> = ru
        .chars()
        .map(|c| match c {
            'ё' => 0xB8,
            'а'..='я' => 0xE0 + (c as u32 - 'а' as u32) as u8,
            'А'..='Я' => 0xC0 + (c as u32 - 'А' as u32) as u8,
            c if c.is_ascii() => c as u8,
            c => panic!("add {c} to the cp1251 table"),
        })
        .collect();
    vec![input("fr.txt", cp1252), input("ru.txt", cp1251)]
}

#[tokio::test]
async fn chardet_detects_legacy_encodings() {
    let mut job = py(r#"
import chardet
for name, enc in [("fr.txt", "cp1252"), ("ru.txt", "cp1251")]:
    raw = open("/input/" + name, "rb").read()
    found = chardet.detect(raw)
    assert raw.decode(found["encoding"]) == raw.decode(enc), found
    print(name, found["encoding"], found["language"])
"#);
    job.inputs = legacy_encoded_inputs();
    assert_eq!(
        ok(job).await,
        "fr.txt Windows-1252 fr\nru.txt Windows-1251 ru\n"
    );
}

#[tokio::test]
async fn charset_normalizer_detects_legacy_encodings() {
    let mut job = py(r#"
import charset_normalizer
for name, enc in [("fr.txt", "cp1252"), ("ru.txt", "cp1251")]:
    raw = open("/input/" + name, "rb").read()
    best = charset_normalizer.from_bytes(raw).best()
    assert str(best) == raw.decode(enc)
    print(name, best.encoding)
print(charset_normalizer.from_bytes("déjà vu ✓".encode("utf-8")).best().encoding)
"#);
    job.inputs = legacy_encoded_inputs();
    let o = ok(job).await;
    assert!(o == "fr.txt cp1252\nru.txt cp1251\nutf_8\n", "{o}");
}

#[tokio::test]
async fn pypdf_writes_a_pdf_with_text_and_reads_it_back() {
    let src = r#"
from pypdf import PdfReader, PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
writer = PdfWriter()
page = writer.add_blank_page(width=612, height=792)
font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                         NameObject("/BaseFont"): NameObject("/Helvetica")})
page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
content = DecodedStreamObject()
content.set_data(b"BT /F1 24 Tf 72 720 Td (Quarterly report 2024) Tj ET")
page[NameObject("/Contents")] = writer._add_object(content)
writer.add_blank_page(width=612, height=792)
writer.add_metadata({"/Title": "Stepbox test", "/Author": "packages.rs"})
writer.compress_identical_objects()
with open("/output/report.pdf", "wb") as f:
    writer.write(f)
reader = PdfReader("/output/report.pdf")
print(len(reader.pages), reader.metadata.title, reader.metadata.author)
print(reader.pages[0].extract_text())
print(repr(reader.pages[1].extract_text()))
"#;
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(
        out(&r),
        "2 Stepbox test packages.rs\nQuarterly report 2024\n''\n"
    );
    assert!(output(&r, "report.pdf").starts_with(b"%PDF-"));
}

#[tokio::test]
async fn markdown_renders_html_with_extensions() {
    let src = r##"
import markdown, importlib.metadata
text = "# Title\n\nSome *emphasis* and `code`.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
print(markdown.markdown(text, extensions=["tables"]))
print(len(importlib.metadata.entry_points(group="markdown.extensions")) > 10)
"##;
    assert_eq!(
        ok(py(src)).await,
        "<h1>Title</h1>\n<p>Some <em>emphasis</em> and <code>code</code>.</p>\n<table>\n<thead>\n<tr>\n<th>a</th>\n<th>b</th>\n</tr>\n</thead>\n<tbody>\n<tr>\n<td>1</td>\n<td>2</td>\n</tr>\n</tbody>\n</table>\nTrue\n"
    );
}

#[tokio::test]
async fn defusedxml_parses_documents_and_refuses_entity_bombs() {
    let src = r#"
import defusedxml.ElementTree as ET
from defusedxml import EntitiesForbidden, DTDForbidden
root = ET.fromstring("<orders><order id='1'>apples</order><order id='2'>pears</order></orders>")
print([(o.get("id"), o.text) for o in root.iter("order")])
bomb = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<lolz>&lol3;</lolz>"""
try:
    ET.fromstring(bomb)
except EntitiesForbidden as e:
    print("refused:", type(e).__name__)
external = '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>'
try:
    ET.fromstring(external)
except EntitiesForbidden as e:
    print("refused:", type(e).__name__)
try:
    ET.fromstring('<!DOCTYPE x><x/>', forbid_dtd=True)
except DTDForbidden as e:
    print("refused:", type(e).__name__)
"#;
    assert_eq!(
        ok(py(src)).await,
        "[('1', 'apples'), ('2', 'pears')]\nrefused: EntitiesForbidden\nrefused: EntitiesForbidden\nrefused: DTDForbidden\n"
    );
}

#[tokio::test]
async fn petl_and_tablib_transform_tables() {
    let mut job = py(r#"
import petl as etl, tablib
t = etl.fromcsv("/input/sales.csv")
t = etl.convert(t, {"units": int, "price": float})
t = etl.addfield(t, "total", lambda r: r["units"] * r["price"])
by_region = etl.aggregate(t, "region", aggregation={"units": ("units", sum), "total": ("total", sum)})
etl.tocsv(etl.sort(by_region, "region"), "/output/by_region.csv")
print(etl.look(etl.select(t, lambda r: r["units"] > 5)))

data = tablib.Dataset().load(open("/input/sales.csv").read(), format="csv")
data.append_col([int(u) * 2 for u in data["units"]], header="double")
print(data.export("json"))
print(data.height, data.headers)
open("/output/sales.xlsx", "wb").write(data.export("xlsx"))
back = tablib.Dataset().load(open("/output/sales.xlsx", "rb").read(), format="xlsx")
print(back.dict == data.dict or [list(map(str, r)) for r in back] == [list(map(str, r)) for r in data])
"#);
    job.inputs = vec![input(
        "sales.csv",
        "region,units,price\nnorth,10,2.5\nsouth,3,4.0\nnorth,2,1.0\neast,7,3.0\n",
    )];
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    let o = out(&r);
    assert!(
        o.starts_with(
            "+---------+-------+-------+-------+\n\
             | region  | units | price | total |\n\
             +=========+=======+=======+=======+\n\
             | 'north' |    10 |   2.5 |  25.0 |\n\
             +---------+-------+-------+-------+\n\
             | 'east'  |     7 |   3.0 |  21.0 |\n\
             +---------+-------+-------+-------+\n\n\
             [{\"region\": \"north\", \"units\": \"10\", \"price\": \"2.5\", \"double\": 20}, "
        ),
        "{o}"
    );
    assert!(
        o.ends_with("]\n4 ['region', 'units', 'price', 'double']\nTrue\n"),
        "{o}"
    );
    assert_eq!(
        String::from_utf8_lossy(output(&r, "by_region.csv")),
        "region,units,total\r\neast,7,21.0\r\nnorth,12,27.0\r\nsouth,3,12.0\r\n"
    );
}

#[tokio::test]
async fn beautifulsoup_parses_html_with_css_selectors() {
    let src = r#"
from bs4 import BeautifulSoup
html = "<html><body><table id='t'><tr><th>k</th><th>v</th></tr><tr class='row'><td>a</td><td>1</td></tr><tr class='row'><td>b</td><td>2</td></tr></table><p>Hi &amp; bye</p></body></html>"
soup = BeautifulSoup(html, "html.parser")
print([[td.get_text() for td in tr.find_all("td")] for tr in soup.select("table#t tr.row")])
print(soup.p.get_text(), soup.select_one("tr.row:nth-of-type(3) td").text)
"#;
    assert_eq!(ok(py(src)).await, "[['a', '1'], ['b', '2']]\nHi & bye b\n");
}

/// The snapshot's objects were frozen before it was taken: a step's full collection walks only
/// what the step made, and still frees the step's garbage.
#[tokio::test]
async fn gc_collect_skips_the_frozen_snapshot_and_still_frees_cycles() {
    let src = r#"
import gc, time, openpyxl
frozen, live = gc.get_freeze_count(), len(gc.get_objects())
class Node:
    pass
gc.disable()
for _ in range(1000):
    a, b = Node(), Node()
    a.other, b.other = b, a
del a, b
t = time.perf_counter()
freed = gc.collect()
ms = (time.perf_counter() - t) * 1000
gc.enable()
times = []
for _ in range(5):
    t = time.perf_counter(); gc.collect(); times.append((time.perf_counter() - t) * 1000)
print(f"frozen={frozen} live={live} freed={freed} first={ms:.2f}ms median={sorted(times)[2]:.2f}ms")
print(frozen > 50_000, live < 20_000, freed >= 2000)
"#;
    let o = ok(py(src)).await;
    eprintln!("{o}");
    assert!(o.ends_with("True True True\n"), "{o}");
}
