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

/// The chunks of the templates this node has pulled, by the digest of their bytes (each pulled
/// template's manifest keeps the chunks it arrived in): where a pull of another version of a
/// template finds its unchanged chunks without fetching them. A chunk found here is read and
/// hashed before it is used; what a record says is only where to look.
struct LocalChunks: Sendable {
    struct Source: Sendable {
        let path: String
        let offset: UInt64

        /// Reads the chunk's `length` bytes into `buffer`.
        func read(into buffer: inout [UInt8], length: Int) throws {
            let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            guard fd >= 0 else {
                throw VMTemplateError(.ioError, "a template this pull copies chunks from went away ('\(TerminalText.escape(path))': \(errnoText())): pull again.", cause: SystemCallError("open"))
            }
            defer { close(fd) }
            switch buffer.withUnsafeMutableBytes({ FileSystem.readFully(fd, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<length]), at: Int64(offset)) }) {
            case .failure(let error):
                throw VMTemplateError(.ioError, "cannot read '\(TerminalText.escape(path))' at \(offset): \(errnoText(error.code)); pull again.", cause: error)
            case .success(let count) where count < length:
                throw VMTemplateError(.ioError, "cannot read '\(TerminalText.escape(path))' at \(offset + UInt64(count)): it is shorter than its manifest says; pull again.")
            case .success:
                break
            }
        }
    }

    /// Chunk digest → where templates here hold those bytes (a few places at most: one may have
    /// been damaged).
    let index: [String: [(source: Source, length: Int)]]
    static let placesPerChunk = 4

    init(store: TemplateStore) {
        var index: [String: [(source: Source, length: Int)]] = [:]
        for template in store.templates().templates {
            guard let chunks = template.manifest.origin?.chunks else { continue }
            let sizes = Dictionary(template.manifest.storedFiles.map { ($0.name, $0.sizeBytes) }, uniquingKeysWith: { first, _ in first })
            for chunk in chunks.prefix(TemplateArtifact.maxLayers) where index[chunk.digest, default: []].count < Self.placesPerChunk {
                // Only the template's own files, in their bounds: a record names a place, nothing more.
                guard let size = sizes[chunk.file], PortableManifest.isFileName(chunk.file), chunk.length > 0,
                      chunk.length <= TemplateArtifact.chunkBytes, chunk.offset <= size, UInt64(chunk.length) <= size - chunk.offset else { continue }
                index[chunk.digest, default: []].append((Source(path: "\(template.directory)/\(chunk.file)", offset: chunk.offset), chunk.length))
            }
        }
        self.index = index
    }

    /// Where this node holds `chunk`'s bytes, read and hashed now; nil if nowhere (or the bytes
    /// there are not the chunk's any more).
    func verifiedSource(of chunk: FileChunk) -> Source? {
        var bytes = [UInt8](repeating: 0, count: chunk.length)
        for place in index[chunk.digest] ?? [] where place.length == chunk.length {
            if (try? place.source.read(into: &bytes, length: chunk.length)) != nil, Digest.hex(SHA256.hash(data: bytes)) == chunk.digest {
                return place.source
            }
        }
        return nil
    }
}
