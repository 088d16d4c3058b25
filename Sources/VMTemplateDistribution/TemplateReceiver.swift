import Crypto
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a pull or an import did.
public struct ReceiveResult: Codable, Sendable {
    public var template: String
    public var digest: String
    /// Chunks fetched now, and chunks found verified from an earlier, interrupted pull.
    public var fetchedChunks: Int
    public var reusedChunks: Int
    public var fetchedBytes: UInt64
    /// Chunks copied from templates this node pulled before (another version's unchanged
    /// chunks), hashed before they were believed.
    public var localChunks: Int
    /// The template was there already, the same (a repeated pull).
    public var existed: Bool

    enum CodingKeys: String, CodingKey {
        case template, digest, existed
        case fetchedChunks = "fetched_chunks"
        case reusedChunks = "reused_chunks"
        case fetchedBytes = "fetched_bytes"
        case localChunks = "local_chunks"
    }

    /// A repeated pull: the template of that digest is there under that name.
    static func existing(_ name: EntityName, digest: String) -> ReceiveResult {
        ReceiveResult(template: name.value, digest: digest, fetchedChunks: 0, reusedChunks: 0, fetchedBytes: 0, localChunks: 0, existed: true)
    }
}

/// Takes a template's OCI artifact from an origin and publishes it in the store, trusting nothing
/// that arrives: the manifest is bounded and (by digest) checked, the config is checked and read
/// first and a template this node's QEMU cannot run is refused before any chunk moves, every blob
/// is verified while it streams into the store's blob cache (`STORE/pulls/blobs`, where a verified
/// blob stays for the next attempt), a chunk taken from a template here is hashed before it is
/// used, and every reassembled file is checked against the portable manifest before one rename
/// publishes it. Files are written sparse: a chunk left out, or a zero page in one, stays a hole.
struct TemplateReceiver: Sendable {
    let store: TemplateStore
    let explicitQEMU: String?

    var pullsDirectory: String { store.pullsDirectory }
    var blobsDirectory: String { store.pullBlobsDirectory }

    func receive(_ reference: String, from origin: any BlobOrigin, name wanted: EntityName?, source: TemplateManifest.Origin) async throws -> ReceiveResult {
        let (manifestBytes, digest) = try await origin.manifest(reference)
        let image: OCIImageManifest
        do {
            image = try JSONDecoder().decode(OCIImageManifest.self, from: Data(manifestBytes))
        } catch {
            throw VMTemplateError(.invalidArgument, "\(origin.label): '\(TerminalText.escape(reference))' is not an OCI image manifest (\(JSONErrorText.describe(error))).")
        }
        guard image.artifactType == TemplateArtifact.artifactType, image.config.mediaType == TemplateArtifact.configMediaType else {
            throw VMTemplateError(.invalidArgument, "\(origin.label): '\(TerminalText.escape(reference))' is an artifact of type '\(TerminalText.escape(String((image.artifactType ?? image.config.mediaType).prefix(80))))', not a vmtemplate template (\(TemplateArtifact.artifactType)).")
        }
        guard image.layers.count <= TemplateArtifact.maxLayers else {
            throw VMTemplateError(.invalidArgument, "\(origin.label): the manifest has \(image.layers.count) layers, more than a template has (\(TemplateArtifact.maxLayers)).")
        }
        let configBytes = try await origin.smallBlob(image.config, limit: TemplateArtifact.maxConfigBytes)
        let portable: PortableManifest
        do {
            portable = try JSONCoding.decoder().decode(PortableManifest.self, from: Data(configBytes))
        } catch {
            throw VMTemplateError(.invalidArgument, "\(origin.label): the template's config cannot be read (\(JSONErrorText.describe(error))).")
        }
        if let problem = portable.problem() {
            throw VMTemplateError(.invalidArgument, "\(origin.label): the template's config is not one vmtemplate made: \(problem).")
        }
        let name = try wanted ?? EntityName(portable.name)
        // A repeated pull (a DaemonSet's loop) is answered before QEMU is probed (three runs of it).
        if store.templateExists(name), let existing = try? store.template(named: name), existing.manifest.origin?.digest == digest {
            return .existing(name, digest: digest)
        }
        let qemu = try checkRunnable(portable)
        let chunks = try Self.chunks(of: image, files: portable.files, origin: origin.label)

        for directory in [pullsDirectory, blobsDirectory] where mkdir(directory, 0o700) != 0 && errno != EEXIST {
            throw VMTemplateError(.ioError, "cannot create '\(directory)': \(errnoText()).", cause: SystemCallError("mkdir"))
        }
        // One pull of a digest at a time: a second waits, then finds the blobs (and the template).
        let lock = try store.openLockFile("\(pullsDirectory)/\(digest.dropFirst(7).prefix(32)).lock")
        return try await lock.withExclusive {
            if store.templateExists(name) {
                let existing = try store.template(named: name)
                if existing.manifest.origin?.digest == digest {
                    return .existing(name, digest: digest)
                }
                throw VMTemplateError(.exists, "template '\(name)' already exists\(existing.manifest.origin.map { " (pulled from \($0.digest))" } ?? ""): remove it first (vmtemplate rm-template \(name)), or pull with --name NEW.")
            }
            // Before any chunk moves: room for every chunk (compressed, in the blob cache) and for
            // every chunk's bytes in the files (the most they take; zero pages are not written).
            let needed = chunks.reduce(UInt64(0)) { $0 + UInt64($1.layer.size) + UInt64($1.length) }
            if let free = try? FileSystem.availableBytes(onFileSystemOf: store.root), free < needed {
                throw VMTemplateError(.ioError, "not enough disk space in store '\(TerminalText.escape(store.root))': the template needs up to \(ByteSize(bytes: needed)) while it is pulled, \(ByteSize(bytes: free)) is free. Free some space (vmtemplate gc, rm-template) or use another --store; nothing was fetched.")
            }
            var result = ReceiveResult(template: name.value, digest: digest, fetchedChunks: 0, reusedChunks: 0, fetchedBytes: 0, localChunks: 0, existed: false)
            let here = LocalChunks(store: store)
            var fromHere: [String: LocalChunks.Source] = [:]
            var missing: [OCIDescriptor] = []
            var wanted = Set<String>()
            for chunk in chunks {
                let path = Self.cached(chunk.layer.digest, in: blobsDirectory)
                // A chunk an earlier attempt kept is hashed again before it is believed; a layer
                // that two chunks share (the same bytes twice) is fetched once.
                if wanted.contains(chunk.layer.digest) {
                    result.reusedChunks += 1
                    continue
                }
                if try await onOwnThread({ Self.holdsVerified(path, chunk.layer) }) {
                    result.reusedChunks += 1
                    continue
                }
                if let source = try await onOwnThread({ here.verifiedSource(of: chunk) }) {
                    fromHere[chunk.key] = source
                    result.localChunks += 1
                    continue
                }
                wanted.insert(chunk.layer.digest)
                missing.append(chunk.layer)
            }
            try await Self.fetch(missing, from: origin, into: blobsDirectory)
            result.fetchedChunks = missing.count
            result.fetchedBytes = missing.reduce(0) { $0 + UInt64($1.size) }
            let staging = try await store.reserveStaging(name)
            do {
                var stored: [TemplateManifest.StoredFile] = []
                for file in portable.files {
                    let path = "\(staging.directory)/\(file.name)"
                    let mine = chunks.filter { $0.file == file.name }
                    let (blobs, sources) = (blobsDirectory, fromHere)
                    // Every byte against the digest the config pins (a hole where data belongs too),
                    // hashed as it is written rather than read back.
                    let digestNow = try await onOwnThread { try Self.assemble(file, at: path, from: mine, blobs: blobs, local: sources) }
                    guard digestNow == file.sha256 else {
                        throw VMTemplateError(.integrityFailure, "\(origin.label): the template's \(file.name) does not hash to the digest its config pins: nothing was published.")
                    }
                    try FileSystem.setMode(path: path, mode: 0o444)
                    let status = try FileStatus.read(path: path, followingLinks: false)
                    stored.append(.init(name: file.name, sizeBytes: status.sizeBytes, sha256: digestNow, mode: status.mode, inode: status.inode, modifiedNanoseconds: status.modifiedNanoseconds))
                }
                var manifest = portable.localManifest(name: name.value, qemu: qemu, files: stored)
                manifest.origin = source.with(digest: digest)
                manifest.origin?.chunks = chunks.map { .init(file: $0.file, offset: $0.offset, length: $0.length, digest: $0.digest) }
                unlink("\(staging.directory)/owner.json")
                try StoredJSON.write(manifest, to: staging.files.manifestPath, mode: 0o444)
                try await store.publish(staging)
            } catch {
                staging.discard()
                throw error
            }
            // The blobs of a published template are not needed again here.
            for chunk in chunks { unlink(Self.cached(chunk.layer.digest, in: blobsDirectory)) }
            return result
        }
    }

    /// Chunks fetched at once: enough to fill a link whose single stream a registry or its CDN
    /// limits, few enough for the memory a registry fetch holds (a chunk each, ~32 MiB at most).
    static let parallelFetches = 4

    /// Fetches `layers` into `directory`, `parallelFetches` at a time; the first failure cancels
    /// the rest (each blob already whole stays, verified, for the next attempt).
    static func fetch(_ layers: [OCIDescriptor], from origin: any BlobOrigin, into directory: String) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = layers.makeIterator()
            func start() -> Bool {
                guard let layer = next.next() else { return false }
                group.addTask {
                    try Task.checkCancellation()
                    try await origin.fetchBlob(layer, to: cached(layer.digest, in: directory))
                }
                return true
            }
            for _ in 0..<parallelFetches {
                if !start() { break }
            }
            while try await group.next() != nil {
                _ = start()
            }
        }
    }

    /// Where the blob cache keeps blob `digest` (a digest checked by `FileChunk.read`).
    static func cached(_ digest: String, in directory: String) -> String {
        "\(directory)/\(digest.dropFirst(7))"
    }

    /// Whether `path` is a regular file holding exactly the blob `descriptor` names.
    static func holdsVerified(_ path: String, _ descriptor: OCIDescriptor) -> Bool {
        var info = stat()
        guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, Int64(info.st_size) == descriptor.size,
              let bytes = FileManager.default.contents(atPath: path) else { return false }
        guard Digest.hex(SHA256.hash(data: bytes)) == descriptor.digest else {
            unlink(path)
            return false
        }
        return true
    }

    /// Refuses, in one line, a template this node's QEMU cannot run: before any chunk moves.
    private func checkRunnable(_ portable: PortableManifest) throws -> TemplateManifest.QEMUInfo {
        let path = try QEMUBinary.locate(explicit: explicitQEMU)
        let binary = try QEMUBinary.probe(path: path)
        guard binary.version == portable.qemu.version else {
            throw VMTemplateError(.unsupported, "the template was made with QEMU \(portable.qemu.version) and this node's \(path) is QEMU \(binary.version): device state only loads into the same QEMU. Pull a template made with QEMU \(binary.version), or pass --qemu with a \(portable.qemu.version) binary.")
        }
        guard (try? binary.resolveMachineType(portable.machine.machineType)) == portable.machine.machineType else {
            throw VMTemplateError(.unsupported, "the template's machine type \(TerminalText.escape(portable.machine.machineType)) is not one this node's QEMU offers: its state cannot load here.")
        }
        if portable.machine.accelerator == .kvm, !KVMProbe.probe().usableForStockGuests {
            throw VMTemplateError(.unsupported, "the template runs under KVM, which this node cannot use for ordinary guests (vmtemplate doctor): pull a TCG template, or make one here.")
        }
        return .init(path: path, version: binary.version, package: binary.package, capabilities: binary.capabilities, binary: try? .init(FileStatus.read(path: path)))
    }

    /// The manifest's layers as chunks, checked to rebuild exactly the config's files: every chunk
    /// of a listed file, in bounds, at a chunk boundary, each range once.
    static func chunks(of image: OCIImageManifest, files: [PortableManifest.File], origin: String) throws -> [FileChunk] {
        var chunks: [FileChunk] = []
        var seen = Set<String>()
        let sizes = Dictionary(uniqueKeysWithValues: files.map { ($0.name, $0.sizeBytes) })
        for layer in image.layers {
            let chunk = try FileChunk.read(layer).get()
            guard let size = sizes[chunk.file], chunk.offset < size,
                  UInt64(chunk.length) == min(UInt64(TemplateArtifact.chunkBytes), size - chunk.offset),
                  seen.insert("\(chunk.file)@\(chunk.offset)").inserted else {
                throw VMTemplateError(.invalidArgument, "\(origin): layer \(chunk.layer.digest) claims \(chunk.length) bytes of \(TerminalText.escape(chunk.file)) at \(chunk.offset), which the template's files do not have (or another layer has): not this template's.")
            }
            chunks.append(chunk)
        }
        return chunks
    }

    /// Makes `path` the file's size, sparse, and writes each chunk's non-zero pages into it; returns
    /// the SHA-256 (hex) of the whole file, zeros between chunks included, as it was written. A
    /// chunk's own bytes need no digest of their own here: its compressed bytes were verified as
    /// they arrived, and the file's digest covers what they decompress to.
    static func assemble(_ file: PortableManifest.File, at path: String, from chunks: [FileChunk], blobs: String, local: [String: LocalChunks.Source] = [:]) throws -> String {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw VMTemplateError(.ioError, "cannot create '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("open")) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(file.sizeBytes)) == 0 else { throw VMTemplateError(.ioError, "cannot size '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("ftruncate")) }
        var plain = [UInt8](repeating: 0, count: TemplateArtifact.chunkBytes)
        var hasher = SHA256()
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var position: UInt64 = 0
        func hashZeros(upTo end: UInt64) {
            while position < end {
                let count = Int(min(UInt64(zeros.count), end - position))
                zeros.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
                position += UInt64(count)
            }
        }
        for chunk in chunks.sorted(by: { $0.offset < $1.offset }) {
            hashZeros(upTo: chunk.offset)
            if let source = local[chunk.key] {
                // Hashed when it was chosen; the file's digest covers it again.
                try source.read(into: &plain, length: chunk.length)
            } else {
                let compressed = try Data(contentsOf: URL(fileURLWithPath: cached(chunk.layer.digest, in: blobs)))
                guard Int64(compressed.count) == chunk.layer.size else {
                    throw VMTemplateError(.integrityFailure, "blob \(chunk.layer.digest) changed in the blob cache: pull again.")
                }
                try compressed.withUnsafeBytes { input in
                    try plain.withUnsafeMutableBytes { output in
                        try Zstd.decompress(input, into: output, expectedBytes: chunk.length)
                    }
                }
            }
            plain.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<chunk.length])) }
            position = chunk.offset + UInt64(chunk.length)
            // Page by page, zero pages skipped: the file stays sparse where the guest's RAM was.
            let page = 4096
            var start = 0
            while start < chunk.length {
                let end = min(start + page, chunk.length)
                let isZero = plain.withUnsafeBytes { ZeroCheck.isZero(UnsafeRawBufferPointer(rebasing: $0[start..<end])) }
                if !isZero {
                    let written = plain.withUnsafeBytes { pwrite(fd, $0.baseAddress.map { $0 + start }, end - start, off_t(chunk.offset) + off_t(start)) }
                    guard written == end - start else {
                        throw VMTemplateError(.ioError, "cannot write '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("pwrite"))
                    }
                }
                start = end
            }
        }
        hashZeros(upTo: file.sizeBytes)
        guard fsync(fd) == 0 else { throw VMTemplateError(.ioError, "cannot sync '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("fsync")) }
        return String(Digest.hex(hasher.finalize()).dropFirst(7))
    }
}
