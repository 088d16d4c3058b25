import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What to clone, and how: checked once, here, whoever asks (``CloneOptions`` makes one from the
/// CLI's options or the API's JSON alike).
public struct CloneRequest: Sendable, Equatable {
    public var template: EntityName
    /// Name for the clone; defaults to its ID.
    public var name: EntityName?
    /// Give the clone a fresh VM generation ID (needs a template made with a `vmgenid` device).
    public var freshGenerationID: Bool
    /// Allow opening the template read-write where QEMU has no `rom=` (< 8.2).
    public var allowWritableTemplate: Bool
    /// TCG translation cache per clone, in MiB (nil: `defaultTranslationCacheMiB`).
    public var tcgTranslationCacheMiB: Int?
    /// How long the restore (and a hand-out's QMP exchange) may take.
    public var timeout: Duration
    /// Copy-on-write the clone may use before the scheduler acts.
    public var cowLimitBytes: UInt64?
    /// The scheduler's action over the limit (nil: the store's setting).
    public var overLimitAction: OverLimitAction?
    /// NICs and disks hot-plugged before the guest runs.
    public var devices = DeviceRequest()
    /// Take a ready member of the template's warm pool when there is one (docs/pools.md).
    public var usePool = true
    /// Return only once the guest sees every hot-plugged device, within ``timeout``
    /// (``DeviceReadiness``): for callers that prefer blocking to following events.
    public var waitForDevices = false
    /// Who waits for the guest's answers to its clock and hostname (``GuestSetup``): a thread of
    /// this process (the default, for long-lived callers), or a forked child (`clone` of the CLI,
    /// which exits at once). Set by the caller's process, not by what it was asked.
    public var guestRepliesInChild = false
    /// A vmtemplate executable that runs a guest agent's per-clone steps (`guest-setup`) when
    /// ``guestRepliesInChild`` (the CLI passes itself); without one a task of this process does.
    public var guestSetupHelper: String?
    /// The channel of a helper already started for this request (``CloneEngine`` starts it).
    var guestSetupChannel: Int32?
    /// The API caller (uid) the clone is made for: it may remove what it made. Set by the server.
    public var requestedBy: uid_t?

    /// The smallest cache that keeps a CPU-bound guest within 10 % of QEMU's default (1 GiB cap):
    /// 16 MiB ran `hash 64` at 1.01x, 8 MiB at 1.21x (docs/benchmarks.md, "Clone tuning").
    public static let defaultTranslationCacheMiB = 16
    public static let translationCacheRangeMiB = 1...65_536
    /// The longest a clone may be given to start: a day.
    public static let maxTimeoutSeconds = 86_400
    /// A second: a restore takes ~50 ms under TCG, so less than this can only fail, and a
    /// caller's deadline below it is a mistake said at once rather than a timeout found later.
    public static let minTimeoutSeconds = 1.0

    public init(template: EntityName, name: EntityName? = nil, freshGenerationID: Bool = true, allowWritableTemplate: Bool = false, tcgTranslationCacheMiB: Int? = nil, timeout: Duration = .seconds(30), cowLimitBytes: UInt64? = nil, overLimitAction: OverLimitAction? = nil) {
        self.cowLimitBytes = cowLimitBytes
        self.overLimitAction = overLimitAction
        self.template = template
        self.name = name
        self.freshGenerationID = freshGenerationID
        self.allowWritableTemplate = allowWritableTemplate
        self.tcgTranslationCacheMiB = tcgTranslationCacheMiB
        self.timeout = timeout
    }

    /// Refuses what no clone can be made with, before anything is reserved. The messages name
    /// the CLI option and the API field.
    public func validate() throws {
        if let tcgTranslationCacheMiB, !Self.translationCacheRangeMiB.contains(tcgTranslationCacheMiB) {
            throw VMTemplateError(.invalidArgument, "the TCG translation cache (--tcg-tb-size, tcg_tb_size) must be \(Self.translationCacheRangeMiB.lowerBound) to \(Self.translationCacheRangeMiB.upperBound) MiB, not \(tcgTranslationCacheMiB).")
        }
        guard timeout >= .seconds(Self.minTimeoutSeconds), timeout <= .seconds(Self.maxTimeoutSeconds) else { throw Self.timeoutRefused }
        try Admission.checkLimit(cowLimitBytes)
        guard devices.count <= MachineSpec.maxHotplugSlots else { throw Self.tooManyDevices(devices.count) }
    }

    /// The refusals ``CloneOptions/request()`` also makes before it parses anything, in the same words.
    static let timeoutRefused = VMTemplateError(.invalidArgument, "the timeout (--timeout, timeout) must be at least \(minTimeoutSeconds) and at most \(maxTimeoutSeconds) seconds.")

    static func tooManyDevices(_ count: Int) -> VMTemplateError {
        VMTemplateError(.invalidArgument, "at most \(MachineSpec.maxHotplugSlots) NICs and disks together (--nic/--disk, nics/disks), not \(count).")
    }
}

/// A clone request as a caller words it: `vmtemplate clone`'s options, or the JSON body of the
/// API's `POST /v1/clones` (the same fields, snake_case). ``request()`` parses and checks it into
/// a ``CloneRequest``, so the CLI and the API can ask for the same things and are refused the
/// same way.
public struct CloneOptions: Sendable, Equatable, Decodable {
    public var template: String
    public var name: String?
    /// A fresh VM generation ID (default true; `--no-vmgenid`).
    public var vmgenid: Bool?
    public var allowWritableTemplate: Bool?
    /// MiB.
    public var tcgTranslationCacheMiB: Int?
    /// Seconds.
    public var timeoutSeconds: Double?
    /// A size (`64M`).
    public var cowLimit: String?
    public var overLimit: OverLimitAction?
    /// `--nic` specs, or the API's NIC objects (``DeviceObject``).
    public var nics: [DeviceObject]?
    /// `--disk` specs, or the API's disk objects.
    public var disks: [DeviceObject]?
    public var noPool: Bool?
    /// Return only once the guest sees every device (``DeviceReadiness``).
    public var waitDevices: Bool?

    public init(template: String, name: String? = nil, vmgenid: Bool? = nil, allowWritableTemplate: Bool? = nil, tcgTranslationCacheMiB: Int? = nil, timeoutSeconds: Double? = nil, cowLimit: String? = nil, overLimit: OverLimitAction? = nil, nics: [String]? = nil, disks: [String]? = nil, noPool: Bool? = nil, waitDevices: Bool? = nil) {
        self.template = template
        self.name = name
        self.vmgenid = vmgenid
        self.allowWritableTemplate = allowWritableTemplate
        self.tcgTranslationCacheMiB = tcgTranslationCacheMiB
        self.timeoutSeconds = timeoutSeconds
        self.cowLimit = cowLimit
        self.overLimit = overLimit
        self.nics = nics?.map(DeviceObject.spec)
        self.disks = disks?.map(DeviceObject.spec)
        self.noPool = noPool
        self.waitDevices = waitDevices
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case template, name, vmgenid, nics, disks
        case allowWritableTemplate = "allow_writable_template"
        case tcgTranslationCacheMiB = "tcg_tb_size"
        case timeoutSeconds = "timeout"
        case cowLimit = "cow_limit"
        case overLimit = "over_limit"
        case noPool = "no_pool"
        case waitDevices = "wait_devices"
    }

    /// An unknown field is refused, not ignored: a misspelt `cow_limt` would otherwise make a
    /// clone without the limit its caller asked for.
    public init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "the clone request")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        template = try c.decode(String.self, forKey: .template)
        name = try c.decodeIfPresent(String.self, forKey: .name)
        vmgenid = try c.decodeIfPresent(Bool.self, forKey: .vmgenid)
        allowWritableTemplate = try c.decodeIfPresent(Bool.self, forKey: .allowWritableTemplate)
        tcgTranslationCacheMiB = try c.decodeIfPresent(Int.self, forKey: .tcgTranslationCacheMiB)
        timeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .timeoutSeconds)
        cowLimit = try c.decodeIfPresent(String.self, forKey: .cowLimit)
        overLimit = try c.decodeIfPresent(OverLimitAction.self, forKey: .overLimit)
        nics = try c.decodeIfPresent([DeviceObject].self, forKey: .nics)
        disks = try c.decodeIfPresent([DeviceObject].self, forKey: .disks)
        noPool = try c.decodeIfPresent(Bool.self, forKey: .noPool)
        waitDevices = try c.decodeIfPresent(Bool.self, forKey: .waitDevices)
    }

    /// The request these options ask for, parsed and checked (``CloneRequest/validate()``);
    /// `descriptors` finds what a NIC's or disk's `fd` names.
    public func request(descriptors: DescriptorLookup = .none) throws -> CloneRequest {
        // Before anything is parsed or converted: a NaN or huge number makes no Duration, and a
        // thousand specs are not parsed to be refused.
        if let timeoutSeconds, !(timeoutSeconds >= CloneRequest.minTimeoutSeconds && timeoutSeconds <= Double(CloneRequest.maxTimeoutSeconds)) {
            throw CloneRequest.timeoutRefused
        }
        let deviceCount = (nics?.count ?? 0) + (disks?.count ?? 0)
        guard deviceCount <= MachineSpec.maxHotplugSlots else { throw CloneRequest.tooManyDevices(deviceCount) }
        var request = CloneRequest(
            template: try EntityName(template),
            name: try name.map { try EntityName($0, kind: "clone") },
            freshGenerationID: vmgenid ?? true,
            allowWritableTemplate: allowWritableTemplate ?? false,
            tcgTranslationCacheMiB: tcgTranslationCacheMiB,
            timeout: timeoutSeconds.map { .seconds(fractional: $0) } ?? .seconds(30),
            cowLimitBytes: try cowLimit.map { try ByteSize(parsing: $0).bytes },
            overLimitAction: overLimit)
        request.devices = try DeviceObject.request(nics: nics ?? [], disks: disks ?? [], descriptors: descriptors)
        request.usePool = noPool != true
        request.waitForDevices = waitDevices == true
        try request.validate()
        return request
    }
}
