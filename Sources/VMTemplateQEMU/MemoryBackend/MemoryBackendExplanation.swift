import VMTemplateOS
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// MARK: - Parsing `share=…,readonly=…,rom=…`

/// The three `memory-backend-file` properties `vmtemplate explain` understands.
public enum MemoryBackendProperty: String, Sendable, Codable, CaseIterable, Hashable {
    case share, readonly, rom

    /// QEMU's value when the property is not given: `share=off`, `readonly=off`, `rom=auto`.
    public var defaultValue: String {
        switch self {
        case .share, .readonly: "off"
        case .rom: "auto"
        }
    }

    /// The values the property accepts, for error messages.
    var allowedValues: String {
        switch self {
        case .share, .readonly: "on or off (QEMU also accepts yes/no, true/false, y/n)"
        case .rom: "on, off or auto"
        }
    }
}

/// Options parsed from text, with a record of which properties were written out.
public struct ParsedMemoryBackendOptions: Sendable, Equatable {
    /// Absent properties hold QEMU's defaults; an absent `rom` is `nil` (QEMU treats it as `auto`).
    public var options: MemoryBackendOptions
    /// The properties the text gave explicitly.
    public var given: Set<MemoryBackendProperty>

    public init(options: MemoryBackendOptions, given: Set<MemoryBackendProperty>) {
        self.options = options
        self.given = given
    }

    /// The properties that took QEMU's default, in `share, readonly, rom` order.
    public var defaulted: [MemoryBackendProperty] {
        MemoryBackendProperty.allCases.filter { !given.contains($0) }
    }
}

extension MemoryBackendOptions {
    /// Parses QEMU's syntax for the three properties, e.g. `share=off,readonly=on,rom=off`.
    ///
    /// Absent properties take QEMU's defaults (`share=off`, `readonly=off`, `rom` not given, which
    /// QEMU treats as `auto`). Use `MemoryBackendOptions.parse(_:)` to learn which were given.
    public init(parsing text: String) throws {
        self = try Self.parse(text).options
    }

    /// Parses `share=…,readonly=…,rom=…` and records which properties were given.
    ///
    /// Booleans accept what QEMU accepts (`on/yes/true/y`, `off/no/false/n`, case-sensitive); `rom`
    /// accepts `on`, `off` and `auto`. Anything else, a property other than these three, a property
    /// given twice, an item without `=` or an empty string is a `.invalidArgument` error.
    public static func parse(_ text: String) throws -> ParsedMemoryBackendOptions {
        let example = "e.g. share=off,readonly=on,rom=off"
        let trimmed = trimmingSpaces(text)
        guard !trimmed.isEmpty else {
            throw VMTemplateError(.invalidArgument, "no memory-backend-file options given: write share=on|off,readonly=on|off,rom=on|off|auto (any of them may be left out), \(example)")
        }
        var share: Bool?
        var readonly: Bool?
        var rom: OnOffAuto?
        var given: [MemoryBackendProperty: String] = [:]
        for item in trimmed.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
            guard !item.isEmpty else {
                throw VMTemplateError(.invalidArgument, "'\(trimmed)' has an empty item between commas: separate key=value pairs with single commas, \(example)")
            }
            guard let equals = item.firstIndex(of: "=") else {
                if item == "memory-backend-file" {
                    throw VMTemplateError(.invalidArgument, "give only the share, readonly and rom properties, without 'memory-backend-file,' in front, \(example)")
                }
                throw VMTemplateError(.invalidArgument, "'\(item)' has no '=': write each option as key=value, \(example)")
            }
            let key = String(item[..<equals])
            let value = String(item[item.index(after: equals)...])
            guard let property = MemoryBackendProperty(rawValue: key) else {
                let name = key.isEmpty ? "'=\(value)' has no property name" : "'\(key)' is not one of the options explained here"
                throw VMTemplateError(.invalidArgument, "\(name): give only share, readonly and rom, the memory-backend-file properties that decide how the file is opened and mapped")
            }
            if let earlier = given[property] {
                throw VMTemplateError(.invalidArgument, "'\(key)' is given twice (\(key)=\(earlier) and \(key)=\(value)): give each option once")
            }
            given[property] = value
            switch property {
            case .share, .readonly:
                guard let flag = qemuBool(value) else {
                    throw VMTemplateError(.invalidArgument, "\(key)=\(value) is not a valid value: use \(property.allowedValues)")
                }
                if property == .share { share = flag } else { readonly = flag }
            case .rom:
                guard let parsed = OnOffAuto(rawValue: value) else {
                    throw VMTemplateError(.invalidArgument, "rom=\(value) is not a valid value: use \(property.allowedValues)")
                }
                rom = parsed
            }
        }
        return ParsedMemoryBackendOptions(
            options: MemoryBackendOptions(share: share ?? false, readonly: readonly ?? false, rom: rom),
            given: Set(given.keys)
        )
    }

    /// The text without surrounding spaces, tabs and newlines (e.g. from a quoted shell argument).
    private static func trimmingSpaces(_ text: String) -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = text.firstIndex(where: { !isSpace($0) }), let last = text.lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(text[first...last])
    }

    /// QEMU's boolean spellings (`qapi_bool_parse`), case-sensitive like QEMU.
    static func qemuBool(_ text: String) -> Bool? {
        switch text {
        case "on", "yes", "true", "y": true
        case "off", "no", "false", "n": false
        default: nil
        }
    }
}


// MARK: - The explanation

/// What QEMU (>= 8.2) does with one `share`/`readonly`/`rom` combination, and optionally whether the
/// current user can open a given file the way QEMU would.
///
/// JSON keys: `share`, `readonly`, `rom`, `resolved_rom` (`"on"`/`"off"`, `rom` also `"auto"`),
/// `valid`, `error`, `open_mode`, `mapping`, `guest_sees` (`"ram"`/`"rom"`), `writes_reach_file`,
/// `explanation`, `typical_use`, `hint`, `file`: fixed strings for what a program compares, prose
/// only in `explanation`, `typical_use`, `hint` and `error`; absent values are written as `null`.
package struct MemoryBackendExplanation: Sendable, Codable, Equatable {
    /// The result of checking a memory file as the current (effective) user.
    public struct FileCheck: Sendable, Codable, Equatable {
        public var path: String
        /// False when the path, or a directory on it, does not exist. A file behind a directory the
        /// user cannot search reports `exists` true and neither `readable` nor `writable`.
        public var exists: Bool
        /// Whether it opens `O_RDONLY` (directories never count: QEMU >= 8.2 refuses them).
        public var readable: Bool
        /// Whether it opens `O_RDWR`.
        public var writable: Bool
        /// Whether QEMU, run as this user, would open it: the combination is accepted and the file
        /// opens with the mode `readonly` asks for. A missing file counts as not opened, although
        /// QEMU creates a new empty file there when `readonly=off`.
        public var wouldOpen: Bool

        public init(path: String, exists: Bool, readable: Bool, writable: Bool, wouldOpen: Bool) {
            self.path = path
            self.exists = exists
            self.readable = readable
            self.writable = writable
            self.wouldOpen = wouldOpen
        }

        enum CodingKeys: String, CodingKey {
            case path, exists, readable, writable
            case wouldOpen = "would_open"
        }
    }

    public var share: Bool
    public var readonly: Bool
    /// As given; `auto` when not given.
    public var rom: OnOffAuto
    /// Whether the guest sees ROM, after `auto` takes the value of `readonly`.
    public var resolvedROM: Bool
    public var valid: Bool
    /// QEMU's own refusal, word for word; nil when QEMU accepts the combination.
    public var error: String?
    /// nil when QEMU refuses the combination.
    public var openMode: FileOpenMode?
    /// nil when QEMU refuses the combination.
    public var mapping: FileMapping?
    /// What the guest sees and where its writes go; nil when QEMU refuses the combination.
    public var guestMemory: String?
    /// What the combination is for; nil when QEMU refuses it.
    public var typicalUse: String?
    /// Advice: how to fix a refused combination, a file QEMU could not open, or a risky choice.
    public var hint: String?
    /// nil unless a file was checked.
    public var file: FileCheck?

    public init(
        share: Bool, readonly: Bool, rom: OnOffAuto, resolvedROM: Bool, valid: Bool, error: String?,
        openMode: FileOpenMode?, mapping: FileMapping?, guestMemory: String?, typicalUse: String?,
        hint: String?, file: FileCheck?
    ) {
        self.share = share
        self.readonly = readonly
        self.rom = rom
        self.resolvedROM = resolvedROM
        self.valid = valid
        self.error = error
        self.openMode = openMode
        self.mapping = mapping
        self.guestMemory = guestMemory
        self.typicalUse = typicalUse
        self.hint = hint
        self.file = file
    }

    enum CodingKeys: String, CodingKey {
        case share, readonly, rom
        case resolvedROM = "resolved_rom"
        case valid, error
        case openMode = "open_mode"
        case mapping
        case guestSees = "guest_sees"
        case writesReachFile = "writes_reach_file"
        case guestMemory = "explanation"
        case typicalUse = "typical_use"
        case hint, file
    }

    /// What the guest sees, as a fixed string; nil when QEMU refuses the combination.
    public var guestSees: String? { valid ? (resolvedROM ? "rom" : "ram") : nil }
    /// Whether the guest's writes reach the file; nil when QEMU refuses the combination.
    public var writesReachFile: Bool? { valid ? (share && !resolvedROM) : nil }

    static func onOff(_ value: Bool) -> String { value ? "on" : "off" }

    /// Writes every key, `null` for absent values (the synthesized encoder would leave them out).
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(Self.onOff(share), forKey: .share)
        try container.encode(Self.onOff(readonly), forKey: .readonly)
        try container.encode(rom, forKey: .rom)
        try container.encode(Self.onOff(resolvedROM), forKey: .resolvedROM)
        try container.encode(valid, forKey: .valid)
        try container.encode(error, forKey: .error)
        try container.encode(openMode, forKey: .openMode)
        try container.encode(mapping, forKey: .mapping)
        try container.encode(guestSees, forKey: .guestSees)
        try container.encode(writesReachFile, forKey: .writesReachFile)
        try container.encode(guestMemory, forKey: .guestMemory)
        try container.encode(typicalUse, forKey: .typicalUse)
        try container.encode(hint, forKey: .hint)
        try container.encode(file, forKey: .file)
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        func onOff(_ key: CodingKeys) throws -> Bool {
            let text = try container.decode(String.self, forKey: key)
            guard text == "on" || text == "off" else {
                throw DecodingError.dataCorruptedError(forKey: key, in: container, debugDescription: "expected \"on\" or \"off\"")
            }
            return text == "on"
        }
        share = try onOff(.share)
        readonly = try onOff(.readonly)
        rom = try container.decode(OnOffAuto.self, forKey: .rom)
        resolvedROM = try onOff(.resolvedROM)
        valid = try container.decode(Bool.self, forKey: .valid)
        error = try container.decodeIfPresent(String.self, forKey: .error)
        openMode = try container.decodeIfPresent(FileOpenMode.self, forKey: .openMode)
        mapping = try container.decodeIfPresent(FileMapping.self, forKey: .mapping)
        guestMemory = try container.decodeIfPresent(String.self, forKey: .guestMemory)
        typicalUse = try container.decodeIfPresent(String.self, forKey: .typicalUse)
        hint = try container.decodeIfPresent(String.self, forKey: .hint)
        file = try container.decodeIfPresent(FileCheck.self, forKey: .file)
    }

    /// The hint QEMU >= 8.2 gives, in vmtemplate's words, when a private mapping fails only
    /// because the file cannot be opened read-write.
    public static let readOnlyFileHint =
        "the file cannot be opened read-write; a private mapping does not need that: use readonly=on,rom=off (QEMU >= 8.2)"

    /// Explains `options`; with `file`, also opens that file the way QEMU would (`O_RDONLY` and
    /// `O_RDWR`, never creating or truncating it, closing it at once) as the current user.
    public static func explain(_ options: MemoryBackendOptions, file: String? = nil) -> MemoryBackendExplanation {
        explain(options, file: file, access: openCheck)
    }

    /// The same, with the file check injected: `access(path, readWrite)` returns 0 when the path
    /// opens with `O_RDWR` (readWrite) or `O_RDONLY`, else the `errno` of the failure.
    static func explain(
        _ options: MemoryBackendOptions, file: String?, access: (_ path: String, _ readWrite: Bool) -> Int32
    ) -> MemoryBackendExplanation {
        let rom = options.rom ?? .auto
        let error = options.validationError
        let valid = error == nil
        var explanation = MemoryBackendExplanation(
            share: options.share, readonly: options.readonly, rom: rom, resolvedROM: options.resolvedROM,
            valid: valid, error: error,
            openMode: valid ? options.openMode : nil,
            mapping: valid ? options.mapping : nil,
            guestMemory: valid ? guestMemory(options) : nil,
            typicalUse: valid ? typicalUse(options) : nil,
            hint: combinationHint(options),
            file: nil
        )
        guard let path = file else { return explanation }

        let readOnlyResult = access(path, false)
        let readWriteResult = access(path, true)
        let missing = readOnlyResult == ENOENT || readOnlyResult == ENOTDIR
        let readable = readOnlyResult == 0
        let writable = readWriteResult == 0
        let opens = options.readonly ? readable : writable
        explanation.file = FileCheck(path: path, exists: !missing, readable: readable, writable: writable, wouldOpen: valid && opens)

        guard valid else { return explanation }
        if missing {
            explanation.hint = options.readonly
                ? "\(path) does not exist, and QEMU >= 8.2 does not create a file for readonly=on: give the path of an existing memory file"
                : "\(path) does not exist: QEMU would create a new, empty file there instead of using a template's memory; check the path"
        } else if readOnlyResult == EISDIR || readWriteResult == EISDIR {
            explanation.hint = "\(path) is a directory: give the memory file itself"
        } else if !options.share, !options.readonly, !writable, isPermissionError(readWriteResult), readable {
            explanation.hint = readOnlyFileHint
        } else if !opens {
            let mode = options.readonly ? "read-only" : "read-write"
            explanation.hint = "QEMU run as this user could not open \(path) \(mode) (\(errnoText(options.readonly ? readOnlyResult : readWriteResult))): fix its permissions or run QEMU as a user that may open it"
        }
        return explanation
    }

    /// The failures that keep a file from opening read-write while read-only may still work.
    /// QEMU >= 8.2 hints only on EACCES; EPERM (e.g. an immutable file) and EROFS (a read-only
    /// mount) are cured by the same change, so they get the hint here too.
    static func isPermissionError(_ code: Int32) -> Bool {
        code == EACCES || code == EPERM || code == EROFS
    }

    /// Opens `path` as QEMU would and closes it at once: never `O_CREAT`, never `O_TRUNC`.
    ///
    /// Directories fail with EISDIR in both modes (QEMU >= 8.2 refuses them too). Device nodes,
    /// FIFOs and sockets are not opened, because opening them can block or have side effects; for
    /// them the effective user's permissions are asked with `faccessat(AT_EACCESS)`.
    static func openCheck(path: String, readWrite: Bool) -> Int32 {
        var info = stat()
        guard stat(path, &info) == 0 else { return errno }
        switch info.st_mode & S_IFMT {
        case S_IFDIR:
            return EISDIR
        case S_IFREG:
            let fd = open(path, (readWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
            guard fd >= 0 else { return errno }
            close(fd)
            return 0
        default:
            let wanted = readWrite ? (R_OK | W_OK) : R_OK
            return faccessat(AT_FDCWD, path, wanted, AT_EACCESS) == 0 ? 0 : errno
        }
    }

    static func guestMemory(_ options: MemoryBackendOptions) -> String {
        if options.resolvedROM { return "ROM; guest writes are discarded, the file never changes" }
        return options.share
            ? "RAM; writes reach the file and every process that maps it"
            : "RAM; writes are private copy-on-write pages, never reach the file"
    }

    static func typicalUse(_ options: MemoryBackendOptions) -> String {
        switch (options.share, options.readonly, options.resolvedROM) {
        case (false, true, false):
            "VM templating clone (QEMU >= 8.2): the template file is never modified and clones share its unwritten pages"
        case (false, false, _):
            "VM templating clone on QEMU < 8.2, which has no rom property; private RAM initialised from a writable file"
        case (true, false, _):
            "template VM (its RAM is the file, so saving it copies nothing), or memory shared with vhost-user or another process"
        case (false, true, true):
            "read-only NVDIMM or firmware image, e.g. a Kata Containers rootfs image"
        case (true, true, _):
            "read-only NVDIMM or firmware image shared by many VMs, e.g. a Kata Containers rootfs image"
        }
    }

    /// Advice that depends only on the combination: how to fix a refusal, or what to watch for.
    static func combinationHint(_ options: MemoryBackendOptions) -> String? {
        if options.validationError != nil {
            if options.readonly {
                return "writable RAM from a file opened read-only needs a private mapping: use share=off,readonly=on,rom=off (a clone), or leave out rom=off to get shared ROM"
            }
            return "ROM needs the file opened read-only: add readonly=on for ROM, or use rom=off (or no rom) for RAM"
        }
        if options.resolvedROM {
            let why = (options.rom ?? .auto) == .auto ? "rom=auto follows readonly=on, so the guest sees ROM" : "the guest sees ROM"
            return "\(why): right for an NVDIMM or firmware image, but a VM's main memory must be writable: use share=off,readonly=on,rom=off for a clone"
        }
        if options.share {
            return "guest writes change the file itself: right for the template VM, never for a clone of a template (use share=off,readonly=on,rom=off)"
        }
        if !options.readonly {
            return "the file is opened read-write although guest writes never reach it: on QEMU >= 8.2 use readonly=on,rom=off, so the kernel itself keeps the file unchanged"
        }
        return nil
    }

    /// `share=…,readonly=…,rom=…` as explained.
    public var optionsText: String {
        "share=\(share ? "on" : "off"),readonly=\(readonly ? "on" : "off"),rom=\(rom.rawValue)"
    }

    /// A few lines for a person: the verdict, then what QEMU does, the hint and the file check.
    public var lines: [String] { lines(defaulted: []) }

    /// The same, noting which properties were not given and took QEMU's default.
    public func lines(defaulted: [MemoryBackendProperty]) -> [String] {
        var lines: [String] = []
        if let error {
            lines.append("QEMU refuses \(optionsText): \(error)")
        } else {
            lines.append("QEMU accepts \(optionsText)")
        }
        func row(_ label: String, _ value: String) {
            let name = label + ":"
            lines.append("  " + name + String(repeating: " ", count: max(1, 13 - name.count)) + value)
        }
        if !defaulted.isEmpty {
            row("defaults", defaulted.map { "\($0.rawValue)=\($0.defaultValue)" }.joined(separator: ", ") + " (not given)")
        }
        if let openMode, let mapping, let guestMemory, let typicalUse {
            row("open", openMode == .readOnly ? "read-only (O_RDONLY)" : "read-write (O_RDWR)")
            row("mapping", mapping == .shared ? "shared (MAP_SHARED)" : "private (MAP_PRIVATE)")
            let resolution = rom == .auto ? " (rom=auto follows readonly=\(readonly ? "on" : "off"))" : ""
            row("guest sees", guestMemory + resolution)
            row("typical use", typicalUse)
        }
        if let hint { row("hint", hint) }
        if let file {
            let state: String
            if !file.exists {
                state = "does not exist"
            } else {
                state = "\(file.readable ? "readable" : "not readable"), \(file.writable ? "writable" : "not writable") by this user"
            }
            var verdict = ""
            if valid {
                let mode = readonly ? "read-only" : "read-write"
                verdict = file.wouldOpen ? "; QEMU would open it \(mode)" : "; QEMU could not open it \(mode)"
            }
            row("file", "\(file.path): \(state)\(verdict)")
        }
        return lines
    }
}
