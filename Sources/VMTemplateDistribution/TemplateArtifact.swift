import Foundation
import VMTemplateOS
import VMTemplateStore

/// How a template travels: one OCI image manifest (image-spec 1.1) with
/// ``artifactType``, whose config is the ``PortableManifest`` and whose layers are the template's
/// files in chunks of ``chunkBytes``, each compressed with zstd on its own (docs/distribution.md).
///
/// A chunk's layer says which file it belongs to, where, how long it is and what its bytes hash
/// to once decompressed (annotations), so any OCI client moves it and vmtemplate reassembles and
/// checks it. A chunk of zeros is not a layer at all: the file is made sparse and those bytes stay
/// a hole, on the wire and on disk.
public enum TemplateArtifact {
    public static let artifactType = "application/vnd.vmtemplate.template.v1"
    public static let configMediaType = "application/vnd.vmtemplate.manifest.v1+json"
    public static let chunkMediaType = "application/vnd.vmtemplate.file.chunk.v1+zstd"
    public static let manifestMediaType = "application/vnd.oci.image.manifest.v1+json"
    public static let indexMediaType = "application/vnd.oci.image.index.v1+json"

    /// Annotations of a chunk's layer.
    public static let fileAnnotation = "org.vmtemplate.file"
    public static let offsetAnnotation = "org.vmtemplate.offset"
    public static let lengthAnnotation = "org.vmtemplate.length"
    public static let chunkDigestAnnotation = "org.vmtemplate.chunk.digest"

    /// 32 MiB: big enough that a 4 GiB guest is 128 requests, small enough that a pull resumes
    /// close to where it stopped and that two versions of a template share most of their chunks.
    public static let chunkBytes = 32 << 20

    /// Bounds on what a registry's manifest may say, checked before anything is downloaded.
    public static let maxManifestBytes = 4 << 20
    public static let maxConfigBytes = 1 << 20
    public static let maxLayers = 65_536
    /// A template file (RAM or disk) of at most 1 TiB.
    public static let maxFileBytes: UInt64 = 1 << 40
}

/// An OCI content descriptor.
public struct OCIDescriptor: Codable, Sendable, Equatable {
    public var mediaType: String
    public var digest: String
    public var size: Int64
    public var annotations: [String: String]?
    public var artifactType: String?

    public init(mediaType: String, digest: String, size: Int64, annotations: [String: String]? = nil, artifactType: String? = nil) {
        self.mediaType = mediaType
        self.digest = digest
        self.size = size
        self.annotations = annotations
        self.artifactType = artifactType
    }
}

/// An OCI image manifest, as far as a template's needs.
public struct OCIImageManifest: Codable, Sendable, Equatable {
    public var schemaVersion: Int
    public var mediaType: String?
    public var artifactType: String?
    public var config: OCIDescriptor
    public var layers: [OCIDescriptor]
    public var annotations: [String: String]?

    public init(config: OCIDescriptor, layers: [OCIDescriptor], annotations: [String: String]? = nil) {
        schemaVersion = 2
        mediaType = TemplateArtifact.manifestMediaType
        artifactType = TemplateArtifact.artifactType
        self.config = config
        self.layers = layers
        self.annotations = annotations
    }
}

/// `index.json` of an OCI image layout.
public struct OCIIndex: Codable, Sendable, Equatable {
    public var schemaVersion: Int
    public var mediaType: String?
    public var manifests: [OCIDescriptor]

    public init(manifests: [OCIDescriptor]) {
        schemaVersion = 2
        mediaType = TemplateArtifact.indexMediaType
        self.manifests = manifests
    }
}

/// One chunk of one template file, as a layer says it.
struct FileChunk: Sendable, Equatable {
    var file: String
    var offset: UInt64
    var length: Int
    /// `sha256:…` of the decompressed bytes.
    var digest: String
    /// The layer (compressed bytes).
    var layer: OCIDescriptor
    /// Which range of which file it is (each range is one chunk's).
    var key: String { "\(file)@\(offset)" }

    /// Reads a layer's annotations; nil with a reason when they are not a chunk's.
    static func read(_ layer: OCIDescriptor) -> Result<FileChunk, VMTemplateError> {
        guard layer.mediaType == TemplateArtifact.chunkMediaType else {
            return .failure(VMTemplateError(.invalidArgument, "a layer has media type '\(TerminalText.escape(String(layer.mediaType.prefix(80))))', not a template chunk's (\(TemplateArtifact.chunkMediaType))."))
        }
        let annotations = layer.annotations ?? [:]
        guard let file = annotations[TemplateArtifact.fileAnnotation], PortableManifest.isFileName(file),
              let offsetText = annotations[TemplateArtifact.offsetAnnotation], let offset = UInt64(offsetText),
              let lengthText = annotations[TemplateArtifact.lengthAnnotation], let length = Int(lengthText),
              let digest = annotations[TemplateArtifact.chunkDigestAnnotation], Digest.isSHA256(digest),
              Digest.isSHA256(layer.digest),
              length > 0, length <= TemplateArtifact.chunkBytes, offset % UInt64(TemplateArtifact.chunkBytes) == 0,
              layer.size > 0, layer.size <= Int64(ZstdBound.of(TemplateArtifact.chunkBytes))
        else {
            return .failure(VMTemplateError(.invalidArgument, "layer \(TerminalText.escape(String(layer.digest.prefix(80)))) does not say which file, offset, length and digest it holds (or says it out of bounds): not a template chunk."))
        }
        return .success(FileChunk(file: file, offset: offset, length: length, digest: digest, layer: layer))
    }
}

/// The most a compressed chunk may take: zstd's own bound for the largest chunk.
enum ZstdBound {
    static func of(_ bytes: Int) -> Int { bytes + bytes / 255 + 64 * 1024 }
}

/// `sha256:` and 64 lowercase hex digits.
enum Digest {
    static func isSHA256(_ text: String) -> Bool {
        text.utf8.count == 71 && text.hasPrefix("sha256:") && text.utf8.dropFirst(7).allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    static func hex(_ digest: some Sequence<UInt8>) -> String {
        "sha256:" + digest.map { String(format: "%02x", $0) }.joined()
    }
}
