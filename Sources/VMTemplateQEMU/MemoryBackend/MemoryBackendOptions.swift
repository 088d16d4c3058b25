import VMTemplateOS
/// QEMU's `on|off|auto` property type (`OnOffAuto` in QAPI).
public enum OnOffAuto: String, Sendable, Codable, CaseIterable {
    case on, off, auto
}

/// The three options of QEMU's `memory-backend-file` that decide what a guest can do to the file,
/// resolved exactly as QEMU >= 8.2 resolves them (`backends/hostmem-file.c`).
///
/// - `readonly` decides how the file is opened (`O_RDONLY` or `O_RDWR`).
/// - `share` decides how it is mapped (`MAP_SHARED` or `MAP_PRIVATE`).
/// - `rom` decides whether the guest sees ROM or RAM; `auto` takes the value of `readonly`, which keeps
///   the pre-8.2 meaning where a file opened read-only was always ROM.
///
/// `rom == nil` means the option is not given at all, which is the only choice on QEMU < 8.2; QEMU
/// then behaves as `rom=auto`.
public struct MemoryBackendOptions: Sendable, Equatable, Codable, Hashable {
    public var share: Bool
    public var readonly: Bool
    public var rom: OnOffAuto?

    public init(share: Bool, readonly: Bool, rom: OnOffAuto? = nil) {
        self.share = share
        self.readonly = readonly
        self.rom = rom
    }

    /// The template VM: its RAM is the file, so saving the template never copies RAM.
    public static let template = MemoryBackendOptions(share: true, readonly: false, rom: nil)
    /// A clone: file opened read-only, mapped private, guest sees writable RAM (copy-on-write).
    public static let clone = MemoryBackendOptions(share: false, readonly: true, rom: .off)
    /// A clone on QEMU < 8.2: the only private writable mapping there opens the file read-write, so
    /// the template is protected by the mapping alone, not by the kernel's file permissions.
    public static let writableClone = MemoryBackendOptions(share: false, readonly: false, rom: nil)

    /// Whether the guest sees read-only memory, after `auto` is resolved.
    public var resolvedROM: Bool {
        switch rom ?? .auto {
        case .on: true
        case .off: false
        case .auto: readonly
        }
    }

    /// QEMU's own refusal for this combination, word for word, or nil when QEMU accepts it.
    public var validationError: String? {
        switch rom ?? .auto {
        case .on where !readonly:
            return "property 'rom' = 'on' is not supported with 'readonly' = 'off'"
        case .off where readonly && share:
            return "property 'rom' = 'off' is incompatible with 'readonly' = 'on' and 'share' = 'on'"
        default:
            return nil
        }
    }

    /// Throws QEMU's own message when QEMU would refuse the combination.
    public func validate() throws {
        if let validationError {
            throw VMTemplateError(.invalidArgument, "memory-backend-file: \(validationError)")
        }
    }

    /// How QEMU opens the file.
    public var openMode: FileOpenMode { readonly ? .readOnly : .readWrite }

    /// How QEMU maps the file.
    public var mapping: FileMapping { share ? .shared : .private }

    /// `share=…,readonly=…[,rom=…]` in QEMU's option syntax.
    public var renderedProperties: [(String, String)] {
        var properties = [("share", share ? "on" : "off"), ("readonly", readonly ? "on" : "off")]
        if let rom { properties.append(("rom", rom.rawValue)) }
        return properties
    }
}

/// How a memory backend file is opened.
public enum FileOpenMode: String, Sendable, Codable {
    case readOnly = "read-only"
    case readWrite = "read-write"
}

/// How a memory backend file is mapped.
public enum FileMapping: String, Sendable, Codable {
    case shared
    case `private`
}
