import CLinuxHost
import Foundation
import Synchronization
import VMTemplateKit
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An OCI image layout in one tar archive (what skopeo and podman call `oci-archive`), read in
/// place: its entries are indexed once, and a blob is read from its offset in the archive. No
/// entry is ever extracted, so an entry's name never becomes a path here: only the layout's own
/// names (`oci-layout`, `index.json`, `blobs/sha256/HEX`) are looked at, every other entry is
/// skipped. The archive is opened once: every read goes through the descriptor that was indexed,
/// never the path again (which could by then name another file).
final class OCIArchive: LayoutFiles {
    let path: String
    private let fd: Int32
    /// Where each layout file's bytes start in the archive, and how many there are.
    let entries: [String: Entry]
    var label: String { "OCI archive '\(TerminalText.escape(path))'" }

    struct Entry: Sendable {
        var offset: Int64
        var length: Int64
    }

    static let layoutMarker = #"{"imageLayoutVersion":"1.0.0"}"#
    /// More headers than a template's layout has by far (its layers, a config, a manifest, an
    /// index, directories), and few enough that a hostile archive cannot keep the scan busy.
    static let maxEntries = 4 * TemplateArtifact.maxLayers + 1024
    /// Real pax headers hold a long name and a few times: well under this.
    static let maxPaxBytes = 16 * 1024
    static let block = 512

    private init(path: String, fd: Int32, entries: [String: Entry]) {
        self.path = path
        self.fd = fd
        self.entries = entries
    }

    deinit {
        close(fd)
    }

    /// Indexes the archive at `path`, checked to be a tar file of an OCI image layout.
    static func open(_ path: String) throws -> OCIArchive {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            throw VMTemplateError(.notFound, "cannot open '\(TerminalText.escape(path))': \(errnoText()); give the directory or tar file 'vmtemplate export' wrote.", cause: SystemCallError("open"))
        }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(path))' is neither a directory nor a regular file: give the OCI layout directory or tar file 'vmtemplate export' wrote.")
        }
        let entries: [String: Entry]
        do {
            entries = try index(fd, size: Int64(info.st_size), label: "'\(TerminalText.escape(path))'")
        } catch {
            close(fd)
            throw error
        }
        let archive = OCIArchive(path: path, fd: fd, entries: entries)
        guard let marker = try? archive.read("oci-layout", limit: 4096), String(decoding: marker, as: UTF8.self).contains("imageLayoutVersion") else {
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(path))' is not an OCI image layout in a tar file (no oci-layout entry): give the directory or tar file 'vmtemplate export' wrote.")
        }
        return archive
    }

    /// The layout's names, as a tar writer may spell them (`./blobs/…`); nil for anything else.
    static func layoutName(_ raw: String) -> String? {
        var name = Substring(raw)
        while name.hasPrefix("./") { name = name.dropFirst(2) }
        if name == "oci-layout" || name == "index.json" { return String(name) }
        guard name.hasPrefix("blobs/sha256/") else { return nil }
        let hex = name.dropFirst("blobs/sha256/".count)
        guard hex.utf8.count == 64, hex.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }) else { return nil }
        return String(name)
    }

    /// Reads every header (ustar, with the pax and GNU long-name extensions a tar writer uses for
    /// long names): where each layout file's bytes are. A pax header's `path` and `size`, and a
    /// GNU long name, apply to the next file header only, as GNU tar and Go's archive/tar apply
    /// them; extension headers always take their own size.
    static func index(_ fd: Int32, size: Int64, label: String) throws -> [String: Entry] {
        var entries: [String: Entry] = [:]
        var position: Int64 = 0
        var nextName: String?
        var nextSize: Int64?
        var headers = 0
        while position + Int64(block) <= size {
            headers += 1
            guard headers <= maxEntries else {
                throw VMTemplateError(.invalidArgument, "\(label) has more than \(maxEntries) entries, more than a template's layout has.")
            }
            let header = try readExactly(fd, at: position, count: block, label: label)
            if header.allSatisfy({ $0 == 0 }) { break }
            guard let recorded = octal(header[148..<156]), recorded == header.enumerated().reduce(0, { $0 + Int64((148..<156).contains($1.offset) ? 0x20 : $1.element) }) else {
                throw VMTemplateError(.invalidArgument, "\(label) is not a tar file (a header's checksum does not hold at byte \(position)): give the directory or tar file 'vmtemplate export' wrote.")
            }
            guard let headerSize = Self.size(header[124..<136]) else {
                throw VMTemplateError(.invalidArgument, "\(label) has a tar header with an unreadable size at byte \(position).")
            }
            let type = header[156]
            let isExtension = [UInt8(ascii: "x"), UInt8(ascii: "g"), UInt8(ascii: "L"), UInt8(ascii: "K")].contains(type)
            let length = isExtension ? headerSize : nextSize ?? headerSize
            let data = position + Int64(block)
            guard length <= size - data else {
                throw VMTemplateError(.invalidArgument, "\(label) is truncated: an entry at byte \(position) runs past its end; copy the whole archive again.")
            }
            var name = string(header[0..<100])
            // POSIX ustar ("ustar\0", not GNU's "ustar "): a name may be split into a prefix.
            if header[257..<263].elementsEqual("ustar\0".utf8), header[345] != 0 {
                name = string(header[345..<500]) + "/" + name
            }
            switch type {
            case UInt8(ascii: "x"):
                guard length <= Int64(maxPaxBytes) else { throw VMTemplateError(.invalidArgument, "\(label) has a pax header of \(length) bytes at byte \(position), more than a tar writer makes.") }
                guard let records = pax(try readExactly(fd, at: data, count: Int(length), label: label)) else {
                    throw VMTemplateError(.invalidArgument, "\(label) has a malformed pax header at byte \(position).")
                }
                // A second one replaces the first, as in GNU tar and Go.
                nextName = records["path"]
                nextSize = nil
                if let text = records["size"] {
                    guard text.utf8.count <= 18, !text.isEmpty, text.utf8.allSatisfy({ (0x30...0x39).contains($0) }), let value = Int64(text) else {
                        throw VMTemplateError(.invalidArgument, "\(label) has a pax size that is not a number at byte \(position).")
                    }
                    nextSize = value
                }
            case UInt8(ascii: "L"):
                guard length <= 4096 else { throw VMTemplateError(.invalidArgument, "\(label) has a long name of \(length) bytes at byte \(position).") }
                nextName = string(try readExactly(fd, at: data, count: Int(length), label: label)[...])
            case UInt8(ascii: "g"), UInt8(ascii: "K"):
                break
            default:
                if type == UInt8(ascii: "0") || type == 0 || type == UInt8(ascii: "7"), let known = layoutName(nextName ?? name) {
                    guard entries[known] == nil else {
                        throw VMTemplateError(.invalidArgument, "\(label) holds \(known) twice: give an archive 'vmtemplate export' or an OCI tool wrote.")
                    }
                    entries[known] = Entry(offset: data, length: length)
                }
                nextName = nil
                nextSize = nil
            }
            position = data + (length + Int64(block) - 1) / Int64(block) * Int64(block)
        }
        return entries
    }

    func open(_ path: String) throws -> (fd: Int32, offset: Int64, length: Int64) {
        guard let entry = entries[path] else { throw VMTemplateError(.notFound, "\(label) lacks \(path): the archive is incomplete.") }
        // The indexed file itself (pread needs no offset of its own), for the caller to close.
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { throw VMTemplateError(.ioError, "cannot read \(label): \(errnoText()).", cause: SystemCallError("fcntl")) }
        return (copy, entry.offset, entry.length)
    }

    static func string(_ field: ArraySlice<UInt8>) -> String {
        String(decoding: field.prefix { $0 != 0 }, as: UTF8.self)
    }

    static func octal(_ field: ArraySlice<UInt8>) -> Int64? {
        let digits = field.drop { $0 == 0x20 }.prefix { $0 != 0 && $0 != 0x20 }
        guard !digits.isEmpty, digits.count <= 22, digits.allSatisfy({ (0x30...0x37).contains($0) }) else { return nil }
        return digits.reduce(0) { $0 * 8 + Int64($1 - 0x30) }
    }

    /// A size in octal, or in base 256 (the GNU form for 8 GiB and more) when its first byte
    /// has the high bit set.
    static func size(_ field: ArraySlice<UInt8>) -> Int64? {
        guard let first = field.first, first & 0x80 != 0 else { return octal(field) }
        guard first == 0x80, field.dropFirst().prefix(3).allSatisfy({ $0 == 0 }), let top = field.dropFirst(4).first, top & 0x80 == 0 else { return nil }
        return field.dropFirst(4).reduce(Int64(0)) { $0 << 8 | Int64($1) }
    }

    /// pax records, `LENGTH KEY=VALUE\n` each (LENGTH counting the whole record, in decimal
    /// digits); nil for anything else.
    static func pax(_ bytes: [UInt8]) -> [String: String]? {
        var records: [String: String] = [:]
        var rest = bytes[...]
        while !rest.isEmpty {
            guard let space = rest.firstIndex(of: 0x20) else { return nil }
            let digits = rest[rest.startIndex..<space]
            guard !digits.isEmpty, digits.count <= 6, digits.allSatisfy({ (0x30...0x39).contains($0) }),
                  let length = Int(String(decoding: digits, as: UTF8.self)),
                  length >= digits.count + 3, length <= rest.count,
                  rest[rest.startIndex + length - 1] == 0x0a else { return nil }
            let record = rest[rest.index(after: space)..<(rest.startIndex + length - 1)]
            guard let equals = record.firstIndex(of: UInt8(ascii: "=")) else { return nil }
            records[String(decoding: record[record.startIndex..<equals], as: UTF8.self)] = String(decoding: record[record.index(after: equals)...], as: UTF8.self)
            rest = rest[(rest.startIndex + length)...]
        }
        return records
    }

    /// `existing` (or a new index) naming the template manifest `digest`, under `tag` if given
    /// (another image of that tag loses it).
    static func index(adding digest: String, size: Int, tag: String?, to existing: OCIIndex?) -> OCIIndex {
        var index = existing ?? OCIIndex(manifests: [])
        let annotations = tag.map { ["org.opencontainers.image.ref.name": $0] }
        index.manifests.removeAll { $0.digest == digest || (tag != nil && $0.annotations?["org.opencontainers.image.ref.name"] == tag) }
        index.manifests.append(OCIDescriptor(mediaType: TemplateArtifact.manifestMediaType, digest: digest, size: Int64(size), annotations: annotations, artifactType: TemplateArtifact.artifactType))
        return index
    }
}

/// Writes a template's layout as one tar archive, named `path` only when it is whole: an export
/// stopped half-way leaves nothing at `path`, and an existing file there is never replaced. The
/// archive is an unnamed file (O_TMPFILE) until then, so no one can swap another file in under
/// its temporary name, and a killed export leaves nothing; on a file system without O_TMPFILE it
/// is a hidden file of a random name beside `path`, renamed without replacing. Entries are in
/// ustar form with fixed owner, mode and time, so the same template makes the same archive byte
/// for byte. Mode 0600: it holds a guest's memory.
final class OCIArchiveWriter: BlobTarget {
    let path: String
    /// The hidden name of the archive, on a file system without O_TMPFILE.
    private let temporary: String?
    private struct State {
        var fd: Int32
        var written: Set<String> = []
        var index: OCIIndex?
    }
    // Mutex: the packer calls one method at a time, but BlobTarget is Sendable and the state is
    // one descriptor and what was written through it.
    private let state: Mutex<State>

    init(path: String) throws {
        var info = stat()
        guard lstat(path, &info) != 0, errno == ENOENT else {
            throw VMTemplateError(.exists, "'\(TerminalText.escape(path))' exists: remove it, or give another path (an export never replaces a file).")
        }
        let (directory, name) = FileSystem.split(path)
        self.path = path
        var fd = Glibc.open(directory, O_WRONLY | O_CLOEXEC | clinuxhost_o_tmpfile(), 0o600)
        if fd >= 0 {
            temporary = nil
        } else {
            guard errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL else {
                throw VMTemplateError(.ioError, "cannot write an archive in '\(TerminalText.escape(directory))': \(errnoText()); the directory must exist and be writable.", cause: SystemCallError("open"))
            }
            let hidden = "\(directory)/.\(name).partial-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
            fd = Glibc.open(hidden, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else {
                throw VMTemplateError(.ioError, "cannot write an archive in '\(TerminalText.escape(directory))': \(errnoText()); the directory must exist and be writable.", cause: SystemCallError("open"))
            }
            temporary = hidden
        }
        state = Mutex(State(fd: fd))
        do {
            try append(name: "oci-layout", Array(OCIArchive.layoutMarker.utf8))
            try append(directory: "blobs/")
            try append(directory: "blobs/sha256/")
        } catch {
            abandon()
            throw error
        }
    }

    func hasBlob(_ descriptor: OCIDescriptor) async throws -> Bool {
        state.withLock { $0.written.contains(descriptor.digest) }
    }

    func putBlob(_ bytes: [UInt8], descriptor: OCIDescriptor) async throws {
        try append(name: try OCILayout.blobPath(descriptor.digest), bytes)
        state.withLock { _ = $0.written.insert(descriptor.digest) }
    }

    func putManifest(_ bytes: [UInt8], digest: String, tag: String?) async throws {
        try append(name: try OCILayout.blobPath(digest), bytes)
        state.withLock { $0.index = OCIArchive.index(adding: digest, size: bytes.count, tag: tag, to: $0.index) }
    }

    /// Writes the index and the end of the archive, and names it `path`.
    func finish() throws {
        guard let index = state.withLock({ $0.index }) else {
            abandon()
            throw VMTemplateError(.internalError, "the archive has no manifest: nothing was exported.")
        }
        do {
            try append(name: "index.json", Array(try JSONCoding.encode(index)))
            let fd = try state.withLock { state in
                try Self.writeAll(state.fd, [UInt8](repeating: 0, count: 2 * OCIArchive.block), path: path)
                guard fsync(state.fd) == 0 else { throw VMTemplateError(.ioError, "cannot sync the archive for '\(TerminalText.escape(path))': \(errnoText()).") }
                return state.fd
            }
            // Neither names an existing file over: EEXIST if one appeared meanwhile.
            let named = temporary.map { Int(clinuxhost_rename_noreplace($0, path)) } ?? (linkat(AT_FDCWD, "/proc/self/fd/\(fd)", AT_FDCWD, path, AT_SYMLINK_FOLLOW) == 0 ? 0 : -Int(errno))
            guard named == 0 else {
                throw VMTemplateError(named == -Int(EEXIST) ? .exists : .ioError, "cannot create '\(TerminalText.escape(path))': \(errnoText(Int32(-named))).")
            }
        } catch {
            abandon()
            throw error
        }
        closeDescriptor()
        // The archive is whole at `path`; a directory that cannot be synced does not undo that.
        try? FileSystem.fsyncDirectory(path: FileSystem.split(path).directory)
    }

    /// Drops the unfinished archive.
    func abandon() {
        closeDescriptor()
        if let temporary { unlink(temporary) }
    }

    private func closeDescriptor() {
        state.withLock { state in
            if state.fd >= 0 { close(state.fd) }
            state.fd = -1
        }
    }

    private func append(name: String, _ bytes: [UInt8]) throws {
        var entry = Self.header(name: name, size: bytes.count, type: UInt8(ascii: "0"), mode: 0o644)
        entry += bytes
        entry += [UInt8](repeating: 0, count: (OCIArchive.block - bytes.count % OCIArchive.block) % OCIArchive.block)
        try state.withLock { try Self.writeAll($0.fd, entry, path: path) }
    }

    private func append(directory: String) throws {
        let entry = Self.header(name: directory, size: 0, type: UInt8(ascii: "5"), mode: 0o755)
        try state.withLock { try Self.writeAll($0.fd, entry, path: path) }
    }

    /// A ustar header; every name here fits its 100 bytes.
    static func header(name: String, size: Int, type: UInt8, mode: Int) -> [UInt8] {
        var header = [UInt8](repeating: 0, count: OCIArchive.block)
        func put(_ text: String, at offset: Int) {
            for (index, byte) in text.utf8.enumerated() { header[offset + index] = byte }
        }
        func octal(_ value: Int, width: Int) -> String {
            let digits = String(value, radix: 8)
            return String(repeating: "0", count: max(0, width - 1 - digits.count)) + digits
        }
        put(name, at: 0)
        put(octal(mode, width: 8), at: 100)
        put(octal(0, width: 8), at: 108)
        put(octal(0, width: 8), at: 116)
        put(octal(size, width: 12), at: 124)
        put(octal(0, width: 12), at: 136)
        header[156] = type
        put("ustar", at: 257)
        put("00", at: 263)
        put("root", at: 265)
        put("root", at: 297)
        put("        ", at: 148)
        let sum = header.reduce(0) { $0 + Int($1) }
        put(octal(sum, width: 7), at: 148)
        header[154] = 0
        return header
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8], path: String) throws {
        guard fd >= 0 else { throw VMTemplateError(.internalError, "the archive was abandoned.") }
        if case .failure(let error) = bytes.withUnsafeBytes({ FileSystem.writeAll(fd, $0) }) {
            throw VMTemplateError(.ioError, "cannot write '\(TerminalText.escape(path))': \(errnoText(error.code)).", cause: error)
        }
    }
}
