//! A ZIP archive of stored (uncompressed) entries, streamed: each entry's CRC-32 and size are
//! known before its bytes are sent (they were computed when the outputs were kept), so no data
//! descriptors and no buffering of the whole archive. No ZIP64: kept outputs are bounded below
//! 4 GiB per tenant (`web.keep_bytes`) and well under 65535 files (the policy's output count).

/// One entry's header facts.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its path in the archive (`/`-separated, UTF-8).
    pub name: String,
    /// Its CRC-32.
    pub crc32: u32,
    /// Its size.
    pub size: u32,
}

/// 1980-01-01 00:00, the earliest DOS date: entries carry no time, so the same outputs give
/// the same archive bytes.
const DOS_DATE: u16 = (1 << 5) | 1;
/// Names are UTF-8 (general purpose flag bit 11).
const UTF8: u16 = 1 << 11;
/// Version 2.0: stored entries with directories.
const VERSION: u16 = 20;

/// The local header that precedes `entry`'s bytes.
pub fn local_header(entry: &Entry) -> Vec<u8> {
    let mut h = Vec::with_capacity(30 + entry.name.len());
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&UTF8.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // stored
    h.extend_from_slice(&0u16.to_le_bytes()); // time
    h.extend_from_slice(&DOS_DATE.to_le_bytes());
    h.extend_from_slice(&entry.crc32.to_le_bytes());
    h.extend_from_slice(&entry.size.to_le_bytes());
    h.extend_from_slice(&entry.size.to_le_bytes());
    h.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // extra
    h.extend_from_slice(entry.name.as_bytes());
    h
}

/// The central directory and its end record, for `entries` written in order from offset 0.
pub fn central_directory(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset: u32 = 0;
    for e in entries {
        out.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes()); // made by
        out.extend_from_slice(&VERSION.to_le_bytes()); // needed
        out.extend_from_slice(&UTF8.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&DOS_DATE.to_le_bytes());
        out.extend_from_slice(&e.crc32.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // extra
        out.extend_from_slice(&0u16.to_le_bytes()); // comment
        out.extend_from_slice(&0u16.to_le_bytes()); // disk
        out.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        out.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
        offset += 30 + e.name.len() as u32 + e.size;
    }
    let size = out.len() as u32;
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// The whole archive of `files` (name, bytes) in memory (tests and small archives).
pub fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entries = Vec::new();
    for (name, bytes) in files {
        let entry = Entry {
            name: name.to_string(),
            crc32: crc32fast::hash(bytes),
            size: bytes.len() as u32,
        };
        out.extend(local_header(&entry));
        out.extend_from_slice(bytes);
        entries.push(entry);
    }
    out.extend(central_directory(&entries));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_reads_the_archive_back() {
        let files: [(&str, &[u8]); 3] = [
            ("report.csv", b"a,b\n1,2\n"),
            ("nested/dir/data.json", b"{\"x\": 1}"),
            ("empty.txt", b""),
        ];
        let bytes = archive(&files);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.zip");
        std::fs::write(&path, &bytes).unwrap();
        // An independent reader: Python's zipfile checks every CRC with testzip().
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, zipfile, json\n\
                 z = zipfile.ZipFile(sys.argv[1])\n\
                 assert z.testzip() is None\n\
                 print(json.dumps({n: z.read(n).decode() for n in z.namelist()}))",
            )
            .arg(&path)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got.len(), 3);
        for (name, bytes) in files {
            assert_eq!(got[name].as_bytes(), bytes);
        }
    }
}
