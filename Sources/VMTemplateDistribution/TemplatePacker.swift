import CLinuxHost
import Crypto
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a push or an export did.
public struct PackResult: Codable, Sendable {
    /// The manifest's digest: what a pull names to get exactly this template.
    public var digest: String
    public var template: String
    /// Chunk layers in the manifest.
    public var layers: Int
    /// Chunks of zeros, left out (holes on the receiving node).
    public var zeroChunks: Int
    /// The template's files, their compressed chunks, and what was actually sent (a chunk the
    /// target had already was not).
    public var fileBytes: UInt64
    public var compressedBytes: UInt64
    public var sentBytes: UInt64

    enum CodingKeys: String, CodingKey {
        case digest, template, layers
        case zeroChunks = "zero_chunks"
        case fileBytes = "file_bytes"
        case compressedBytes = "compressed_bytes"
        case sentBytes = "sent_bytes"
    }
}

/// Turns a published template into its OCI artifact (``TemplateArtifact``) in a target: each file
/// read in chunks, zero chunks left out, the others compressed and digested, sent unless the
/// target has them; then the config (``PortableManifest``) and the manifest.
struct TemplatePacker: Sendable {
    let store: TemplateStore

    func pack(_ name: EntityName, to target: any BlobTarget, tag: String?) async throws -> PackResult {
        let template = try store.template(named: name)
        let manifest = template.manifest
        // The files must be the ones the manifest pins: a push never ships what it did not verify.
        try CloneLauncher(store: store).checkFiles(of: template)
        var layers: [OCIDescriptor] = []
        var result = PackResult(digest: "", template: name.value, layers: 0, zeroChunks: 0, fileBytes: 0, compressedBytes: 0, sentBytes: 0)
        for file in manifest.storedFiles {
            let path = "\(template.directory)/\(file.name)"
            result.fileBytes += file.sizeBytes
            var offset: UInt64 = 0
            var fileHasher = SHA256()
            while offset < file.sizeBytes {
                let length = Int(min(UInt64(TemplateArtifact.chunkBytes), file.sizeBytes - offset))
                let chunkOffset = offset
                let chunk = try await onOwnThread { try Self.readChunk(path: path, offset: chunkOffset, length: length) }
                fileHasher.update(data: chunk.plain)
                offset += UInt64(length)
                guard let compressed = chunk.compressed else {
                    result.zeroChunks += 1
                    continue
                }
                let descriptor = OCIDescriptor(mediaType: TemplateArtifact.chunkMediaType, digest: Digest.hex(SHA256.hash(data: compressed)), size: Int64(compressed.count), annotations: [
                    TemplateArtifact.fileAnnotation: file.name,
                    TemplateArtifact.offsetAnnotation: String(chunkOffset),
                    TemplateArtifact.lengthAnnotation: String(length),
                    TemplateArtifact.chunkDigestAnnotation: chunk.digest,
                ])
                result.compressedBytes += UInt64(compressed.count)
                if try await !target.hasBlob(descriptor) {
                    try await target.putBlob(compressed, descriptor: descriptor)
                    result.sentBytes += UInt64(compressed.count)
                }
                layers.append(descriptor)
            }
            // What was read is what the manifest pins (a file changed in place after the quick
            // check would otherwise be shipped under the old digest).
            guard Digest.hex(fileHasher.finalize()) == "sha256:\(file.sha256)" else {
                throw VMTemplateError(.integrityFailure, "template '\(name)''s \(file.name) does not hash to its manifest's digest: run vmtemplate verify \(name); nothing was pushed under its name.")
            }
        }
        let config = try JSONCoding.encode(PortableManifest(manifest), pretty: false)
        let configDescriptor = OCIDescriptor(mediaType: TemplateArtifact.configMediaType, digest: Digest.hex(SHA256.hash(data: config)), size: Int64(config.count))
        if try await !target.hasBlob(configDescriptor) {
            try await target.putBlob(Array(config), descriptor: configDescriptor)
            result.sentBytes += UInt64(config.count)
        }
        let image = OCIImageManifest(config: configDescriptor, layers: layers, annotations: ["org.opencontainers.image.title": name.value])
        let bytes = Array(try JSONCoding.encode(image, pretty: false))
        let digest = Digest.hex(SHA256.hash(data: bytes))
        try await target.putManifest(bytes, digest: digest, tag: tag)
        result.digest = digest
        result.layers = layers.count
        return result
    }

    struct Chunk: Sendable {
        var plain: [UInt8]
        /// nil: all zeros.
        var compressed: [UInt8]?
        var digest: String
    }

    /// Reads `length` bytes at `offset`; a range that is a hole (`SEEK_DATA` finds no data in
    /// it) or reads as zeros is not compressed.
    static func readChunk(path: String, offset: UInt64, length: Int) throws -> Chunk {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw VMTemplateError(.ioError, "cannot read '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("open")) }
        defer { close(fd) }
        var plain = [UInt8](repeating: 0, count: length)
        let data = clinuxhost_seek_data(fd, Int64(offset), 1)
        let isHole = data == -Int64(ENXIO) || (data >= 0 && UInt64(data) >= offset + UInt64(length))
        if !isHole {
            switch plain.withUnsafeMutableBytes({ FileSystem.readFully(fd, into: $0, at: Int64(offset)) }) {
            case .failure(let error):
                throw VMTemplateError(.ioError, "cannot read '\(TerminalText.escape(path))' at \(offset): \(errnoText(error.code)).", cause: error)
            case .success(let count) where count < length:
                throw VMTemplateError(.ioError, "cannot read '\(TerminalText.escape(path))' at \(offset + UInt64(count)): it is shorter than its manifest says.")
            case .success:
                break
            }
        }
        let digest = Digest.hex(SHA256.hash(data: plain))
        if isHole || isZero(plain) { return Chunk(plain: plain, compressed: nil, digest: digest) }
        let compressed = try plain.withUnsafeBytes { try Zstd.compress($0) }
        return Chunk(plain: plain, compressed: compressed, digest: digest)
    }

    static func isZero(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes(ZeroCheck.isZero)
    }
}

enum ZeroCheck {
    /// Whether every byte is 0, a word at a time.
    static func isZero(_ raw: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        while index + 8 <= raw.count {
            if raw.loadUnaligned(fromByteOffset: index, as: UInt64.self) != 0 { return false }
            index += 8
        }
        while index < raw.count {
            if raw[index] != 0 { return false }
            index += 1
        }
        return true
    }
}
