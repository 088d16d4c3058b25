import Crypto
import Foundation
import VMTemplateKit
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where a template's blobs go: a registry (``RegistryClient``) or an OCI image layout
/// (``OCILayout``).
protocol BlobTarget: Sendable {
    /// Whether the target has the blob already (a push then skips it).
    func hasBlob(_ descriptor: OCIDescriptor) async throws -> Bool
    func putBlob(_ bytes: [UInt8], descriptor: OCIDescriptor) async throws
    /// Stores the manifest and, with a tag, names it.
    func putManifest(_ bytes: [UInt8], digest: String, tag: String?) async throws
}

/// Where a template's blobs come from.
protocol BlobOrigin: Sendable {
    /// The manifest's bytes and digest, for a tag or a digest (`sha256:…`); its bytes are checked
    /// against a digest asked for.
    func manifest(_ reference: String) async throws -> (bytes: [UInt8], digest: String)
    /// A small blob (the config), checked against its descriptor.
    func smallBlob(_ descriptor: OCIDescriptor, limit: Int) async throws -> [UInt8]
    /// Writes the blob to `path` (a new file), checked against its descriptor's size and digest
    /// while it arrives: a blob that is not what it says leaves nothing there.
    func fetchBlob(_ descriptor: OCIDescriptor, to path: String) async throws
    /// How the origin names itself in messages.
    var label: String { get }
}

/// The files of an OCI image layout (image-spec `image-layout.md`: `oci-layout`, `index.json`,
/// `blobs/sha256/HEX`), wherever they are kept: a directory (``OCILayoutDirectory``) or a tar
/// archive (``OCIArchive``).
protocol LayoutFiles: Sendable {
    var label: String { get }
    /// A descriptor of the file's bytes (open for reading), where they start in it and how many
    /// there are. The caller closes it.
    func open(_ path: String) throws -> (fd: Int32, offset: Int64, length: Int64)
}

extension LayoutFiles {
    /// The whole of a small file, at most `limit` bytes.
    func read(_ path: String, limit: Int) throws -> [UInt8] {
        let (fd, offset, length) = try open(path)
        defer { close(fd) }
        guard length <= Int64(limit) else { throw VMTemplateError(.integrityFailure, "\(path) in \(label) is larger than the \(limit) bytes accepted.") }
        return try Self.readExactly(fd, at: offset, count: Int(length), label: label)
    }

    static func readExactly(_ fd: Int32, at offset: Int64, count: Int, label: String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        switch bytes.withUnsafeMutableBytes({ FileSystem.readFully(fd, into: $0, at: offset) }) {
        case .failure(let error):
            throw VMTemplateError(.ioError, "cannot read \(label) at byte \(offset): \(errnoText(error.code)).", cause: error)
        case .success(let read) where read < count:
            throw VMTemplateError(.ioError, "cannot read \(label) at byte \(offset + Int64(read)): it ends there.")
        case .success:
            return bytes
        }
    }

}

/// Reads a template from an OCI image layout's files: what `import` publishes.
struct OCILayout: BlobOrigin {
    let files: any LayoutFiles
    var label: String { files.label }

    func manifest(_ reference: String) async throws -> (bytes: [UInt8], digest: String) {
        let digest: String
        if Digest.isSHA256(reference) {
            digest = reference
        } else {
            let index: OCIIndex
            do {
                index = try JSONDecoder().decode(OCIIndex.self, from: Data(files.read("index.json", limit: TemplateArtifact.maxManifestBytes)))
            } catch let error as VMTemplateError {
                throw error
            } catch {
                throw VMTemplateError(.invalidArgument, "index.json in \(label) is not an OCI image index (\(JSONErrorText.describe(error))).")
            }
            let templates = index.manifests.filter { $0.mediaType == TemplateArtifact.manifestMediaType }
            let named = reference.isEmpty ? templates : templates.filter { $0.annotations?["org.opencontainers.image.ref.name"] == reference }
            guard named.count == 1, let only = named.first else {
                throw VMTemplateError(named.isEmpty ? .notFound : .invalidArgument, named.isEmpty
                    ? "\(label) has no image\(reference.isEmpty ? "" : " named '\(TerminalText.escape(reference))'"): see its index.json."
                    : "\(label) holds \(named.count) images: name one (--image TAG or --image sha256:…).")
            }
            digest = only.digest
        }
        let bytes = try files.read(try Self.blobPath(digest), limit: TemplateArtifact.maxManifestBytes)
        guard Digest.hex(SHA256.hash(data: bytes)) == digest else {
            throw VMTemplateError(.integrityFailure, "the manifest \(digest) in \(label) does not hash to its digest: the layout is damaged.")
        }
        return (bytes, digest)
    }

    func smallBlob(_ descriptor: OCIDescriptor, limit: Int) async throws -> [UInt8] {
        guard descriptor.size >= 0, descriptor.size <= Int64(limit) else {
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) is \(descriptor.size) bytes, more than the \(limit) accepted.")
        }
        let bytes = try files.read(try Self.blobPath(descriptor.digest), limit: limit)
        try BlobCheck.verify(bytes, against: descriptor, from: label)
        return bytes
    }

    func fetchBlob(_ descriptor: OCIDescriptor, to path: String) async throws {
        let source = try Self.blobPath(descriptor.digest)
        let (files, label) = (self.files, self.label)
        try await onOwnThread {
            let (input, start, length) = try files.open(source)
            defer { close(input) }
            let writer = try VerifyingWriter(path: path, descriptor: descriptor, origin: label)
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var done: Int64 = 0
            // One byte more than the layout says it holds, if the blob is longer than its
            // descriptor: the writer refuses it.
            let wanted = min(length, descriptor.size + 1)
            while done < wanted {
                let count = buffer.withUnsafeMutableBytes { pread(input, $0.baseAddress, Int(min(Int64($0.count), wanted - done)), off_t(start + done)) }
                if count < 0 && errno == EINTR { continue }
                guard count >= 0 else { writer.abandon(); throw VMTemplateError(.ioError, "cannot read \(source) in \(label): \(errnoText()).") }
                if count == 0 { break }
                done += Int64(count)
                try buffer.withUnsafeBytes { try writer.write(UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
            }
            try writer.finish()
        }
    }

    static func blobPath(_ digest: String) throws -> String {
        guard Digest.isSHA256(digest) else { throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(String(digest.prefix(80))))' is not a sha256 digest.") }
        return "blobs/sha256/\(digest.dropFirst(7))"
    }
}

/// An OCI image layout in a directory: what `export` writes and `import` reads.
struct OCILayoutDirectory: LayoutFiles, BlobTarget {
    let directory: String
    var label: String { "OCI layout '\(TerminalText.escape(directory))'" }

    /// Makes the layout's directories (the directory may exist, and hold other images).
    static func create(at directory: String) throws -> OCILayoutDirectory {
        for path in [directory, "\(directory)/blobs", "\(directory)/blobs/sha256"] {
            guard mkdir(path, 0o755) == 0 || errno == EEXIST else {
                throw VMTemplateError(.ioError, "cannot create '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("mkdir"))
            }
        }
        let layout = OCILayoutDirectory(directory: directory)
        try FileSystem.writeFileAtomically(path: "\(directory)/oci-layout", data: Array(OCIArchive.layoutMarker.utf8))
        return layout
    }

    /// An existing layout, checked to be one.
    static func open(_ directory: String) throws -> OCILayoutDirectory {
        guard let text = try? String(contentsOfFile: "\(directory)/oci-layout", encoding: .utf8), text.contains("imageLayoutVersion") else {
            throw VMTemplateError(.notFound, "'\(TerminalText.escape(directory))' is not an OCI image layout (no oci-layout file): give the directory or tar file 'vmtemplate export' wrote.")
        }
        return OCILayoutDirectory(directory: directory)
    }

    func hasBlob(_ descriptor: OCIDescriptor) async throws -> Bool {
        var info = stat()
        return lstat("\(directory)/\(try OCILayout.blobPath(descriptor.digest))", &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG && Int64(info.st_size) == descriptor.size
    }

    func putBlob(_ bytes: [UInt8], descriptor: OCIDescriptor) async throws {
        // 0600: chunks of a guest's memory.
        try FileSystem.writeFileAtomically(path: "\(directory)/\(try OCILayout.blobPath(descriptor.digest))", data: bytes, mode: 0o600)
    }

    func putManifest(_ bytes: [UInt8], digest: String, tag: String?) async throws {
        try FileSystem.writeFileAtomically(path: "\(directory)/\(try OCILayout.blobPath(digest))", data: bytes)
        let existing = (try? read("index.json", limit: TemplateArtifact.maxManifestBytes)).flatMap { try? JSONDecoder().decode(OCIIndex.self, from: Data($0)) }
        let index = OCIArchive.index(adding: digest, size: bytes.count, tag: tag, to: existing)
        try FileSystem.writeFileAtomically(path: "\(directory)/index.json", data: try JSONCoding.encode(index))
    }

    func open(_ path: String) throws -> (fd: Int32, offset: Int64, length: Int64) {
        let fd = Glibc.open("\(directory)/\(path)", O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else {
            throw VMTemplateError(.notFound, "\(label) lacks \(path): the layout is incomplete.", cause: SystemCallError("open"))
        }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw VMTemplateError(.invalidArgument, "\(path) in \(label) is not a regular file.")
        }
        return (fd, 0, Int64(info.st_size))
    }
}

enum BlobCheck {
    static func verify(_ bytes: [UInt8], against descriptor: OCIDescriptor, from origin: String) throws {
        guard Int64(bytes.count) == descriptor.size else {
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) from \(origin) is \(bytes.count) bytes, not the \(descriptor.size) its manifest says: nothing was published.")
        }
        guard Digest.hex(SHA256.hash(data: bytes)) == descriptor.digest else {
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) from \(origin) does not hash to its digest: nothing was published.")
        }
    }
}

/// Writes a blob as it arrives into `PATH.partial`, hashing it and counting its bytes, and
/// renames it to `PATH` only if both are what its descriptor says: what is at `PATH` is always a
/// verified blob (a later pull reuses it), and a partial one never stays.
final class VerifyingWriter {
    let path: String
    let descriptor: OCIDescriptor
    let origin: String
    private let fd: Int32
    private var hasher = SHA256()
    private var written: Int64 = 0

    init(path: String, descriptor: OCIDescriptor, origin: String) throws {
        self.path = path
        self.descriptor = descriptor
        self.origin = origin
        unlink("\(path).partial")
        fd = Glibc.open("\(path).partial", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw VMTemplateError(.ioError, "cannot create '\(TerminalText.escape(path)).partial': \(errnoText()).", cause: SystemCallError("open")) }
    }

    deinit {
        close(fd)
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws {
        written += Int64(bytes.count)
        guard written <= descriptor.size else {
            abandon()
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) from \(origin) is longer than the \(descriptor.size) bytes its manifest says: nothing was published.")
        }
        hasher.update(bufferPointer: bytes)
        if case .failure(let error) = FileSystem.writeAll(fd, bytes) {
            abandon()
            throw VMTemplateError(.ioError, "cannot write '\(TerminalText.escape(path)).partial': \(errnoText(error.code)).", cause: error)
        }
    }

    func finish() throws {
        guard written == descriptor.size else {
            abandon()
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) from \(origin) ended after \(written) of \(descriptor.size) bytes: nothing was published.")
        }
        guard Digest.hex(hasher.finalize()) == descriptor.digest else {
            abandon()
            throw VMTemplateError(.integrityFailure, "blob \(descriptor.digest) from \(origin) does not hash to its digest (a damaged or tampered blob): nothing was published.")
        }
        // No fsync: a pull that reuses a chunk from an earlier attempt hashes it again (a crash
        // may have left it short or torn); the files it rebuilds are synced before publication.
        guard rename("\(path).partial", path) == 0 else {
            let code = errno
            abandon()
            throw VMTemplateError(.ioError, "cannot keep blob \(descriptor.digest): \(errnoText(code)).")
        }
    }

    func abandon() {
        unlink("\(path).partial")
    }
}
