import VMTemplateOS

/// Where `fd=` in a NIC or disk spec finds its descriptor: for the CLI, a descriptor number the
/// command inherited (``inherited``); for the API, a token its caller got from `serve`'s
/// descriptor socket. Without one, `fd=` is refused.
public struct DescriptorLookup: Sendable {
    let find: @Sendable (String, GivenDescriptor.Kind) throws -> GivenDescriptor

    public init(_ find: @escaping @Sendable (_ reference: String, _ kind: GivenDescriptor.Kind) throws -> GivenDescriptor) {
        self.find = find
    }

    public static let none = DescriptorLookup { _, _ in
        throw VMTemplateError(.invalidArgument, "fd= is not taken here: pass a descriptor token from the server's descriptor socket (docs/api.md, \"Descriptors\").")
    }

    /// `fd=N`: descriptor N of this process, as its caller left it open.
    public static let inherited = DescriptorLookup { reference, kind in
        let given = try GivenDescriptor.inherited(reference)
        guard given.kind == kind else {
            throw VMTemplateError(.invalidArgument, "\(given.label) is a \(given.kind.rawValue), not a \(kind.rawValue): pass it as --\(given.kind == .tap ? "nic" : "disk") fd=\(reference).")
        }
        return given
    }
}

/// A NIC as asked for on the command line (`--nic SPEC`).
///
/// - `tap=IFNAME[,netns=PATH][,mac=MAC]`: the tap device in that network namespace, opened by
///   vmtemplate (made if it does not exist) and passed to QEMU as a descriptor;
/// - `fd=N[,mac=MAC]`: a tap the caller opened (``GivenDescriptor``), passed on as it is;
/// - `user[,hostfwd=RULE]...[,mac=MAC]`: QEMU's user-mode network, for hosts without privileges.
public struct NICSpec: Sendable, Equatable {
    public enum Backend: Sendable, Equatable {
        case tap(name: String, namespacePath: String?)
        case descriptor(GivenDescriptor)
        case user(hostForwards: [String])
    }

    public var backend: Backend
    /// nil: derived from the clone's ID (``MACAddress/derived(seed:index:)``).
    public var mac: MACAddress?

    public init(backend: Backend, mac: MACAddress? = nil) {
        self.backend = backend
        self.mac = mac
    }

    public init(parsing text: String, descriptors: DescriptorLookup = .none) throws {
        let options = try DeviceOptions(text, what: "--nic", example: "--nic tap=tap0,netns=/run/netns/ns1 or --nic user,hostfwd=tcp:127.0.0.1:2222-:22")
        var tap: String?
        var descriptorReference: String?
        var namespacePath: String?
        var user = false
        var forwards: [String] = []
        var mac: MACAddress?
        for (key, value) in options.pairs {
            switch (key, value) {
            case ("tap", let name?):
                guard TapDevice.isValidName(name) else { throw options.error("tap=\(name) is not an interface name (1 to 15 letters, digits, '.', '_' or '-')") }
                tap = name
            case ("netns", let path?):
                guard path.hasPrefix("/") else { throw options.error("netns= takes the path of a namespace file, such as /run/netns/NAME") }
                namespacePath = path
            case ("fd", let reference?):
                descriptorReference = reference
            case ("user", nil):
                user = true
            case ("hostfwd", let rule?):
                guard Self.isHostForward(rule) else { throw options.error("hostfwd=\(rule) is not a forwarding rule: write [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, e.g. tcp:127.0.0.1:2222-:22") }
                forwards.append(rule)
            case ("mac", let address?):
                mac = try MACAddress(parsing: address)
            default:
                throw options.error("unknown or incomplete option '\(key)\(value.map { "=\($0)" } ?? "")' (tap=IFNAME, netns=PATH, fd=N, user, hostfwd=RULE, mac=MAC)")
            }
        }
        if let descriptorReference {
            // Checked before the lookup, which takes the descriptor.
            guard tap == nil, namespacePath == nil, !user, forwards.isEmpty else {
                throw options.error("fd= is the tap itself: give it alone (with mac= if wanted), without tap=, netns=, user or hostfwd=")
            }
            backend = .descriptor(try descriptors.find(descriptorReference, .tap))
            self.mac = mac
            return
        }
        switch (tap, user) {
        case (let name?, false):
            guard forwards.isEmpty else { throw options.error("hostfwd= goes with user, not with tap=") }
            backend = .tap(name: name, namespacePath: namespacePath)
        case (nil, true):
            guard namespacePath == nil else { throw options.error("netns= goes with tap=, not with user") }
            guard forwards.count <= 16 else { throw options.error("at most 16 hostfwd= rules") }
            // One host port (per protocol and address) takes one rule: QEMU would fail the second.
            let hostSides = forwards.map { rule in
                let host = rule.split(separator: "-", maxSplits: 1)[0].split(separator: ":", omittingEmptySubsequences: false)
                return "\(host[0].isEmpty ? "tcp" : host[0]):\(host[1]):\(host[2].drop { $0 == "0" })"
            }
            guard Set(hostSides).count == hostSides.count else { throw options.error("two hostfwd= rules forward the same host port: give each port once") }
            backend = .user(hostForwards: forwards)
        default:
            throw options.error("say either tap=IFNAME, fd=N or user")
        }
        self.mac = mac
    }

    /// `[tcp|udp]:[addr]:port-[addr]:port`, checked enough that QEMU gets nothing but such a rule.
    static func isHostForward(_ rule: String) -> Bool {
        let halves = rule.split(separator: "-", omittingEmptySubsequences: false)
        guard halves.count == 2, rule.utf8.count <= 64 else { return false }
        let host = halves[0].split(separator: ":", omittingEmptySubsequences: false)
        let guest = halves[1].split(separator: ":", omittingEmptySubsequences: false)
        guard host.count == 3, ["", "tcp", "udp"].contains(host[0]), guest.count == 2 else { return false }
        // ASCII digits: isNumber alone takes any script's digits, which QEMU would not.
        func isAddress(_ part: Substring) -> Bool { part.allSatisfy { ($0.isASCII && $0.isNumber) || $0 == "." } }
        func isPort(_ part: Substring) -> Bool { UInt16(part).map { $0 > 0 } ?? false }
        return isAddress(host[1]) && isPort(host[2]) && isAddress(guest[0]) && isPort(guest[1])
    }
}

/// The format of a disk image. Never probed: a raw image whose guest wrote a qcow2 header would
/// otherwise be opened as qcow2, with a backing file of the guest's choosing.
public enum DiskFormat: String, Sendable, Codable, CaseIterable {
    case raw
    case qcow2
}

/// A disk as asked for on the command line (`--disk SPEC`):
/// `path=FILE[,format=raw|qcow2][,readonly=on][,overlay=on]`, or `fd=N` instead of `path=` for an
/// image the caller opened (``GivenDescriptor``).
public struct DiskSpec: Sendable, Equatable {
    public enum Source: Sendable, Equatable {
        case path(String)
        case descriptor(GivenDescriptor)
    }

    public var source: Source
    /// The image's path, when it was given by path.
    public var path: String? {
        if case .path(let path) = source { return path }
        return nil
    }
    public var format: DiskFormat
    /// The guest may not write it.
    public var readOnly: Bool
    /// The clone writes to a qcow2 overlay of its own on `path`; `path` is opened read-only.
    public var overlay: Bool

    public init(path: String, format: DiskFormat = .raw, readOnly: Bool = false, overlay: Bool = false) {
        self.init(source: .path(path), format: format, readOnly: readOnly, overlay: overlay)
    }

    public init(source: Source, format: DiskFormat = .raw, readOnly: Bool = false, overlay: Bool = false) {
        self.source = source
        self.format = format
        self.readOnly = readOnly
        self.overlay = overlay
    }

    public init(parsing text: String, descriptors: DescriptorLookup = .none) throws {
        let options = try DeviceOptions(text, what: "--disk", example: "--disk path=/var/lib/images/base.qcow2,format=qcow2,overlay=on")
        var path: String?
        var descriptorReference: String?
        var format = DiskFormat.raw
        var readOnly = false
        var overlay = false
        for (key, value) in options.pairs {
            switch (key, value) {
            case ("path", let file?):
                guard file.hasPrefix("/") else { throw options.error("path= takes an absolute path") }
                guard file.utf8.count <= 4096 else { throw options.error("path= is longer than 4096 bytes") }
                path = file
            case ("fd", let reference?):
                descriptorReference = reference
            case ("format", let name?):
                guard let known = DiskFormat(rawValue: name) else { throw options.error("format=\(name) is not raw or qcow2") }
                format = known
            case ("readonly", let flag?):
                readOnly = try options.flag(flag, key)
            case ("overlay", let flag?):
                overlay = try options.flag(flag, key)
            default:
                throw options.error("unknown or incomplete option '\(key)\(value.map { "=\($0)" } ?? "")' (path=FILE or fd=N, format=raw|qcow2, readonly=on, overlay=on)")
            }
        }
        if readOnly && overlay { throw options.error("readonly=on and overlay=on together: an overlay exists to take the clone's writes; pick one") }
        switch (path, descriptorReference) {
        case (let path?, nil):
            self.init(path: path, format: format, readOnly: readOnly, overlay: overlay)
        case (nil, let reference?):
            // Last: the lookup takes the descriptor, so nothing may fail after it.
            self.init(source: .descriptor(try descriptors.find(reference, .disk)), format: format, readOnly: readOnly, overlay: overlay)
        case (nil, nil):
            throw options.error("path=FILE (or fd=N) is missing")
        case (.some, .some):
            throw options.error("path= and fd= together: give the image one way")
        }
    }
}

/// `key[=value],...` as QEMU writes options, parsed strictly: no empty items, no `,,` escapes
/// (a comma in a path is refused rather than guessed at).
struct DeviceOptions {
    let text: String
    let what: String
    let example: String
    var pairs: [(String, String?)] = []

    init(_ text: String, what: String, example: String) throws {
        self.text = text
        self.what = what
        self.example = example
        guard !text.isEmpty, text.utf8.count <= 8192 else { throw error("it is empty or too long") }
        guard !text.utf8.contains(where: { $0 < 0x20 || $0 == 0x7f }) else { throw error("it contains control characters") }
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard !item.isEmpty else { throw error("it has an empty item (a comma too many, or a comma in a path, which is not supported)") }
            if let equals = item.firstIndex(of: "=") {
                pairs.append((String(item[..<equals]), String(item[item.index(after: equals)...])))
            } else {
                pairs.append((String(item), nil))
            }
        }
        let keys = pairs.map(\.0).filter { $0 != "hostfwd" }
        guard Set(keys).count == keys.count else { throw error("an option is given twice") }
    }

    func error(_ reason: String) -> VMTemplateError {
        VMTemplateError(.invalidArgument, "\(what) '\(TerminalText.escape(text))': \(TerminalText.escape(reason)). Example: \(example).")
    }

    func flag(_ value: String, _ key: String) throws -> Bool {
        switch value {
        case "on", "yes", "true": return true
        case "off", "no", "false": return false
        default: throw error("\(key)=\(value) is not on or off")
        }
    }
}
