import CZstd
import Foundation
import VMTemplateOS

/// zstd, one chunk at a time: a template's files travel as chunks of ``TemplateArtifact/chunkBytes``,
/// each compressed on its own, so chunks are fetched in parallel, resumed one by one, and shared
/// between versions of a template.
enum Zstd {
    /// Level 3, zstd's default: on this machine's template RAM ~0.46 s per 256 MiB to compress.
    static let level: Int32 = 3

    static func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8] {
        let bound = ZSTD_compressBound(input.count)
        var output = [UInt8](repeating: 0, count: bound)
        let written = output.withUnsafeMutableBytes { ZSTD_compress($0.baseAddress, bound, input.baseAddress, input.count, level) }
        guard ZSTD_isError(written) == 0 else {
            throw VMTemplateError(.internalError, "zstd could not compress a chunk: \(String(cString: ZSTD_getErrorName(written))).")
        }
        output.removeSubrange(written...)
        return output
    }

    /// Decompresses `input`, which must hold exactly `expectedBytes` when decompressed: a chunk
    /// that decompresses to more (a bomb) or less is refused, whatever its frame header claims.
    static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, expectedBytes: Int) throws {
        guard let context = ZSTD_createDCtx() else { throw VMTemplateError(.internalError, "zstd could not make a decompression context.") }
        defer { ZSTD_freeDCtx(context) }
        guard output.count >= expectedBytes else { throw VMTemplateError(.internalError, "the output buffer is smaller than the chunk.") }
        var source = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        // One byte of room beyond the expected size: a frame that fills it is too long.
        var target = ZSTD_outBuffer(dst: output.baseAddress, size: min(output.count, expectedBytes + 1), pos: 0)
        var result = 0
        repeat {
            result = ZSTD_decompressStream(context, &target, &source)
            guard ZSTD_isError(result) == 0 else {
                throw VMTemplateError(.integrityFailure, "a chunk is not valid zstd: \(String(cString: ZSTD_getErrorName(result))).")
            }
            guard target.pos <= expectedBytes else {
                throw VMTemplateError(.integrityFailure, "a chunk decompresses to more than the \(expectedBytes) bytes its layer says.")
            }
        } while source.pos < source.size
        guard result == 0 else {
            throw VMTemplateError(.integrityFailure, "a chunk's zstd frame ends early (\(target.pos) of \(expectedBytes) bytes).")
        }
        guard target.pos == expectedBytes else {
            throw VMTemplateError(.integrityFailure, "a chunk decompresses to \(target.pos) bytes, not the \(expectedBytes) its layer says.")
        }
    }
}
